"""The GPU's memory: the device batch that fits, and what counts as running out."""

# Out-of-memory failures that are not torch.OutOfMemoryError: cuBLAS and cuDNN report theirs as RuntimeError
_OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS")


def is_out_of_memory(e):
    import torch
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(m in str(e) for m in _OOM_MESSAGES))


def fit_device_batch(model, B, T, autocast_ctx):
    """The largest of B, B/2, B/4, ... sequences of T tokens whose forward and backward fit in GPU memory.
    train.py keeps TOTAL_BATCH_SIZE, so more gradient accumulation makes up for a smaller device batch:
    the same optimisation, only slower. On the GPU the first try also compiles the model, with inputs laid
    out as the loader yields them (views of one (B, T + 1) buffer), so that training does not compile again."""
    import torch
    device = next(model.parameters()).device
    while True:
        try:
            rows = torch.zeros(B, T + 1, dtype=torch.long, device=device)
            with autocast_ctx:
                model(rows[:, :-1], rows[:, 1:]).backward()
            break
        except Exception as e:
            if B == 1 or not is_out_of_memory(e):
                raise
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":   # free the failed attempt, and forget its peak
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        print(f"DEVICE_BATCH_SIZE = {B} runs out of GPU memory: using {B // 2} "
              f"(set it in train.py to skip this search)")
        B //= 2
    model.zero_grad(set_to_none=True)
    return B
