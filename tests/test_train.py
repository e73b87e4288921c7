"""
train.py on the CPU: model size and FLOPs, the optimizer and the harness's attention against references,
compiling once, lean evaluation, the fast fail, the refusal without a GPU, and the smoke run.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import types
import weakref
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

import prepare
from conftest import fails_in_one_line, one_line, toy_train_py
from harness import attention, smoke
from harness.formats import SUMMARY_KEYS

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "train.py"


def load_train_definitions():
    """Exec train.py up to its `# Setup` banner: the model, optimizer and hyperparameters, without training."""
    src = TRAIN.read_text()
    prefix = src[:re.search(r"^# Setup", src, re.M).start()]
    module = types.ModuleType("train_definitions")
    sys.modules[module.__name__] = module  # dataclasses look up their module
    exec(compile(prefix, str(TRAIN), "exec"), module.__dict__)
    module.fa3 = prepare.load_attention(torch.device("cpu"), 64, [], 0)  # what train.py's setup does, on the CPU
    return module


@pytest.fixture(scope="module")
def tr():
    return load_train_definitions()


STEP_BUDGET = 3  # timed steps of a toy run: its outcome depends on the seed, never on the machine's speed


def subprocess_env(cache, **extra):
    """The CPU path even on a GPU machine, the given cache; no step budget unless given (one thread: conftest)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTORESEARCH_", "HF_"))}
    return {**env, "AUTORESEARCH_CACHE": str(cache), "PYTHONPATH": str(ROOT),
            "CUDA_VISIBLE_DEVICES": "", **extra}


def run_script(path, cache, log_path, timeout=240):
    """`python train.py > run.log 2>&1` against the tiny cache, step-budgeted; returns (returncode, log bytes)."""
    env = subprocess_env(cache, AUTORESEARCH_STEP_BUDGET=str(STEP_BUDGET))
    with open(log_path, "wb") as log:
        proc = subprocess.run([sys.executable, str(path)], cwd=path.parent, env=env, stdout=log,
                              stderr=subprocess.STDOUT, timeout=timeout)
    return proc.returncode, Path(log_path).read_bytes()

# ---------------------------------------------------------------------------
# Model size, names and FLOPs at the reference defaults (meta device: nothing allocated)


def default_model(tr):
    model_dim = math.ceil(tr.DEPTH * tr.ASPECT_RATIO / tr.HEAD_DIM) * tr.HEAD_DIM  # round_up(DEPTH x ASPECT_RATIO, HEAD_DIM)
    n_head = model_dim // tr.HEAD_DIM
    config = tr.GPTConfig(sequence_len=2048, vocab_size=8192, n_layer=tr.DEPTH, n_head=n_head, n_kv_head=n_head,
                          n_embd=model_dim, window_pattern=tr.WINDOW_PATTERN)
    with torch.device("meta"):
        return tr.GPT(config)


def test_hyperparameters_are_the_reference_values(tr):
    assert (tr.DEPTH, tr.ASPECT_RATIO, tr.HEAD_DIM, tr.WINDOW_PATTERN) == (8, 64, 128, "SSSL")
    assert (tr.TOTAL_BATCH_SIZE, tr.DEVICE_BATCH_SIZE) == (2**19, 128)
    assert (tr.EMBEDDING_LR, tr.UNEMBEDDING_LR, tr.MATRIX_LR, tr.SCALAR_LR) == (0.6, 0.004, 0.04, 0.5)
    assert (tr.WEIGHT_DECAY, tr.ADAM_BETAS) == (0.2, (0.8, 0.95))
    assert (tr.WARMUP_RATIO, tr.WARMDOWN_RATIO, tr.FINAL_LR_FRAC) == (0.0, 0.5, 0.0)
    assert tr.TOTAL_BATCH_SIZE // (tr.DEVICE_BATCH_SIZE * 2048) == 2  # gradient-accumulation micro-steps


def test_default_model_has_50_332_176_parameters(tr):
    model = default_model(tr)
    assert (model.config.n_embd, model.config.n_head) == (512, 4)
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    assert sum(sizes.values()) == 50_332_176
    assert sizes["transformer.wte.weight"] == 4_194_304
    assert sizes["lm_head.weight"] == 4_194_304
    assert sorted(n for n in sizes if n.startswith("value_embeds.")) == [f"value_embeds.{i}.weight" for i in (1, 3, 5, 7)]
    assert sum(v for n, v in sizes.items() if n.startswith("value_embeds.")) == 16_777_216
    matrices = [f"transformer.h.{i}.{m}.weight" for i in range(8)
                for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert sum(sizes.pop(n) for n in matrices) == 25_165_824
    gates = [f"transformer.h.{i}.attn.ve_gate.weight" for i in (1, 3, 5, 7)]  # 32 -> n_kv_head on value-embed layers
    assert sum(sizes.pop(n) for n in gates) == 4 * 32 * 4
    assert sizes.pop("resid_lambdas") + sizes.pop("x0_lambdas") == 16
    assert set(sizes) == {"transformer.wte.weight", "lm_head.weight"} | {f"value_embeds.{i}.weight" for i in (1, 3, 5, 7)}


def test_default_windows_and_flops_per_token(tr):
    model = default_model(tr)
    assert model.window_sizes == [1024, 1024, 1024, 2048, 1024, 1024, 1024, 2048]
    matmul_params = 50_332_176 - 4_194_304 - 16_777_216 - 16  # all but the embedding tables and the scalars
    attention = 12 * 4 * 128 * (6 * 1024 + 2 * 2048)  # 12 x n_head x head_dim x min(window, T), per layer
    assert model.estimate_flops() == 6 * matmul_params + attention == 239_078_400


def test_window_pattern_keeps_the_last_layer_full(tr):
    config = tr.GPTConfig(sequence_len=256, vocab_size=64, n_layer=3, n_head=1, n_kv_head=1, n_embd=32, window_pattern="S")
    assert tr.window_sizes(config) == [128, 128, 256]


def test_optimizer_groups(tr):
    model = default_model(tr)
    opt = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.6, matrix_lr=0.04, weight_decay=0.2,
                                adam_betas=(0.8, 0.95), scalar_lr=0.5)
    s = (512 / 768) ** -0.5
    adamw = [g for g in opt.param_groups if g["kind"] == "adamw"]
    assert [g["params"] for g in adamw] == [[model.lm_head.weight], [model.transformer.wte.weight],
                                            list(model.value_embeds.parameters()), [model.resid_lambdas], [model.x0_lambdas]]
    assert [g["lr"] for g in adamw] == pytest.approx([0.004 * s, 0.6 * s, 0.6 * s, 0.005, 0.5])
    assert [g["betas"] for g in adamw] == [(0.8, 0.95)] * 4 + [(0.96, 0.95)]
    assert all(g["eps"] == 1e-10 and g["weight_decay"] == 0.0 for g in adamw)
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    shapes = {tuple(g["params"][0].shape): len(g["params"]) for g in muon}
    assert shapes == {(512, 512): 32, (2048, 512): 8, (512, 2048): 8, (4, 32): 4}
    assert all(g["lr"] == 0.04 and g["momentum"] == 0.95 and g["weight_decay"] == 0.2 for g in muon)
    assert all(g["initial_lr"] == g["lr"] for g in opt.param_groups)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_a_parameter_in_no_optimizer_group_fails_loudly(tr):
    model = default_model(tr)
    model.logit_scale = torch.nn.Parameter(torch.ones((), device="meta"))  # the agent adds a parameter...
    with pytest.raises(AssertionError, match="exactly one optimizer group.*logit_scale"):  # ...that would never train
        model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.6, matrix_lr=0.04, weight_decay=0.2,
                              adam_betas=(0.8, 0.95), scalar_lr=0.5)

# ---------------------------------------------------------------------------
# Optimizer: AdamW against torch.optim.AdamW, Muon against a plain per-matrix rewrite of SPEC


@pytest.mark.parametrize("betas", [(0.8, 0.95), (0.96, 0.95)])
def test_adamw_matches_torch_optim_adamw(tr, betas):
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(64, 32, generator=gen)
    ours, ref = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt = tr.MuonAdamW([dict(kind="adamw", params=[ours], lr=0.01, betas=betas, eps=1e-10, weight_decay=0.1)])
    ref_opt = torch.optim.AdamW([ref], lr=0.01, betas=betas, eps=1e-10, weight_decay=0.1)
    for step in range(6):
        grad = torch.randn(64, 32, generator=gen)
        ours.grad, ref.grad = grad.clone(), grad.clone()
        for o in (opt, ref_opt):
            o.param_groups[0]["lr"] = 0.01 * (1 - step / 6)  # a schedule, as in training
        opt.step()
        ref_opt.step()
        torch.testing.assert_close(ours.data, ref.data, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ours.data, start)


@pytest.mark.parametrize("shape", [(3, 256, 64), (3, 64, 256), (2, 4, 32)])
def test_polar_express_leaves_singular_values_near_one(tr, shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    X = tr.polar_express(G)
    assert X.dtype == torch.bfloat16
    sv = torch.linalg.svdvals(X.float())
    assert sv.min() > 0.7 and sv.max() < 1.2, (sv.min(), sv.max())


def reference_muon(p, g, buf, second, lr, momentum, wd, beta2, polar_express):
    """SPEC section 3's four Muon steps for one matrix, written out plainly."""
    buf = buf + (1 - momentum) * (g - buf)  # Nesterov: buf <- lerp(buf, g, 1 - mu), g <- lerp(g, buf, mu)
    g = g + momentum * (buf - g)
    X = polar_express(g).float()
    rows, cols = X.shape
    dim = 1 if rows >= cols else 0  # NorMuon: per-row (tall or square) or per-column (wide) mean of squares
    second = beta2 * second + (1 - beta2) * X.square().mean(dim=dim, keepdim=True)
    U = X / second.clamp_min(1e-10).sqrt()
    U = U * (X.norm() / U.norm())
    lr = lr * max(1.0, rows / cols) ** 0.5
    p = p - lr * U - lr * wd * p * (U * p >= 0).float()  # cautious weight decay
    return p, buf, second


def make_muon(tr, shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    groups, params = [], []
    for shape, n in shapes:
        ps = [torch.nn.Parameter(0.1 * torch.randn(shape, generator=gen)) for _ in range(n)]
        groups.append(dict(kind="muon", params=ps, lr=0.02, momentum=0.95, beta2=0.95, weight_decay=0.2))
        params += ps
    return params, tr.MuonAdamW(groups)


def muon_steps(tr, opt, params, steps, seed=1):
    """Several steps with fresh gradients and hyperparameters that change every step, as the schedules do."""
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        for group in opt.param_groups:
            group["lr"] = 0.02 * (1 - step / steps)
            if group["kind"] == "muon":
                group["momentum"] = 0.85 + 0.02 * step
                group["weight_decay"] = 0.2 * (1 - step / steps)
        opt.step()
    return [p.detach().clone() for p in params]


def test_muon_matches_plain_reference(tr):
    shapes = [((48, 16), 2), ((16, 48), 2), ((24, 24), 1)]
    params, opt = make_muon(tr, shapes)
    refs = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in refs]
    seconds = [torch.zeros(p.shape[0], 1) if p.shape[0] >= p.shape[1] else torch.zeros(1, p.shape[1]) for p in refs]
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        lr, momentum, wd = 0.02 * (1 - step / 4), 0.85 + 0.02 * step, 0.2 * (1 - step / 4)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        for group in opt.param_groups:
            group.update(lr=lr, momentum=momentum, weight_decay=wd)
        opt.step()
        for i, g in enumerate(grads):
            refs[i], bufs[i], seconds[i] = reference_muon(refs[i], g, bufs[i], seconds[i], lr, momentum, wd, 0.95,
                                                          tr.polar_express)
        for p, ref in zip(params, refs):
            torch.testing.assert_close(p.data, ref, rtol=1e-5, atol=1e-6)


def test_changing_hyperparameters_does_not_recompile(tr):
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    counter = CompileCounter()
    params, opt = make_muon(tr, [((64, 32), 3), ((32, 64), 2)])
    extra = torch.nn.Parameter(torch.randn(16, 8))
    opt.add_param_group(dict(kind="adamw", params=[extra], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0))
    compile = lambda f: torch.compile(f, backend=counter, dynamic=False, fullgraph=True)  # as train.py does on the GPU
    opt.adamw_step, opt.muon_step = compile(tr.adamw_step), compile(tr.muon_step)
    muon_steps(tr, opt, params + [extra], steps=5)
    assert counter.frame_count == 3  # one graph per distinct shape (2 Muon, 1 AdamW), none per new lr/momentum/wd/step
    torch._dynamo.reset()

# ---------------------------------------------------------------------------
# Attention, in the harness: the fallback against an explicit masked softmax (FA3's loader: test_attention.py)


def reference_attention(q, k, v, window):
    """(B, T, H, D): query i attends to keys i - window ... i."""
    T, D = q.size(1), q.size(-1)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / D**0.5
    i = torch.arange(T, device=q.device)
    allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] <= window)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def check_attention(attention, window, T, device, atol):
    gen = torch.Generator().manual_seed(window)
    q, k, v, dy = (torch.randn(2, T, 3, 16, generator=gen).to(device) for _ in range(4))
    grads = []
    for fn in (lambda *t: attention.flash_attn_func(*t, causal=True, window_size=(window, 0)),
               lambda *t: reference_attention(*t, window)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        y = fn(*leaves)
        y.backward(dy)
        grads.append((y.detach(), *(t.grad for t in leaves)))
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("window", [64, 63, 16, 1, 0])
def test_fallback_attention_matches_masked_softmax(window):
    attention = prepare.load_attention(torch.device("cpu"), 16, [window], 64)
    assert attention.path == "sdpa-cpu"
    check_attention(attention, window, T=64, device="cpu", atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [256, 128, 100])
def test_flex_attention_matches_masked_softmax_on_gpu(window):
    check_attention(attention.Attention(None, "flex+sdpa", ""), window, T=256, device="cuda", atol=1e-3)


def test_train_py_calls_the_harness_attention_once_and_holds_no_kernel_code():
    src = TRAIN.read_text()
    assert src.count("load_attention(") == 1
    assert src.count("fa3.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))") == 1
    for gone in ("get_kernel", "flex_attention", "create_block_mask", "GPU_PEAK_FLOPS = {"):
        assert gone not in src

def test_tiny_model_is_causal_and_learns(tr):
    """A few CPU steps on a repeated batch: logits (B, T, V) that ignore the future, and a falling loss."""
    torch.manual_seed(0)
    config = tr.GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, window_pattern="SL")
    model = tr.GPT(config)
    model.init_weights()
    opt = model.setup_optimizer(0.004, 0.6, 0.04, 0.2, (0.8, 0.95), 0.5)
    x = torch.randint(0, 64, (4, 32))
    y = torch.roll(x, -1, dims=1)
    losses = []
    for _ in range(10):
        loss = model(x, y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    logits = model(x)
    assert logits.shape == (4, 32, 64) and logits.dtype == torch.float32 and logits.abs().max() <= 15
    probe = x.clone()
    probe[:, 20:] = (probe[:, 20:] + 1) % 64
    assert torch.allclose(model(probe)[:, :20], logits[:, :20], atol=1e-5)

# ---------------------------------------------------------------------------
# Fitting the GPU: the device batch halves until it fits (in train.py's own run: the smoke run below)


class Greedy(torch.nn.Module):
    """Fits at most 2 sequences: beyond that it fails the way a GPU does (or with another error)."""

    def __init__(self, error):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.error = error

    def forward(self, x, y):
        if x.size(0) > 2:
            raise self.error
        return (self.w * x.float()).sum()


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB"),
                                   RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"),
                                   RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"),
                                   RuntimeError("NVML_SUCCESS == r INTERNAL ASSERT FAILED: out of memory")])
def test_every_out_of_memory_variant_halves_the_device_batch(harness, error, capsys):
    assert harness.fit_device_batch(Greedy(error), 8, 16, nullcontext()) == 2
    out = capsys.readouterr().out
    assert "DEVICE_BATCH_SIZE = 8 runs out of GPU memory: using 4" in out
    assert "DEVICE_BATCH_SIZE = 4 runs out of GPU memory: using 2" in out


def test_other_errors_are_not_taken_for_out_of_memory(harness):
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        harness.fit_device_batch(Greedy(RuntimeError("mat1 and mat2 shapes cannot be multiplied")), 8, 16, nullcontext())


# ---------------------------------------------------------------------------
# One compile for training, one for evaluation; evaluation holds one batch of logits at a time


def test_one_compile_for_training_one_for_evaluation(tr, harness, monkeypatch):
    """The real model, compiled with a counting backend, over train.py's calls: fit the batch, train, evaluate."""
    from torch._dynamo.testing import CompileCounter
    tok = harness.Tokenizer.from_directory()
    T = harness.MAX_SEQ_LEN
    monkeypatch.setattr(harness, "EVAL_TOKENS", 16 * T)   # 16 validation rows and 4 test rows: full batches of 4
    config = tr.GPTConfig(sequence_len=T, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=1, n_kv_head=1,
                          n_embd=64, window_pattern="SL")
    torch.manual_seed(0)
    model = tr.GPT(config)
    model.init_weights()
    optimizer = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.6, matrix_lr=0.04, weight_decay=0.2,
                                      adam_betas=(0.8, 0.95), scalar_lr=0.5)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, dynamic=False)  # as train.py does on the GPU
    B = harness.fit_device_batch(compiled, 4, T, nullcontext())
    loader = harness.make_dataloader(tok, B, T, "train", device="cpu")
    for _ in range(3):  # train.py's loop: 2 micro-steps per step on the loader's batches
        for _ in range(2):
            x, y, _ = next(loader)
            (compiled(x, y) / 2).backward()
        optimizer.step()
        compiled.zero_grad(set_to_none=True)
    graphs_in_training = counter.frame_count
    compiled.eval()
    assert harness.EVAL_TOKENS // T % B == 0 == harness.EVAL_TOKENS // T // 4 % B  # full batches, probe's and test's
    val_bpb = harness.evaluate_bpb(compiled, tok, B)
    torch._dynamo.reset()
    assert (graphs_in_training, counter.frame_count) == (1, 2)  # on main: 2 and 4 (stride 65 vs 64 recompiled)
    assert 0 < val_bpb < 10


class LiveLogits(torch.nn.Module):
    """A causal bigram model that records, at each call, how many of its earlier outputs are still alive."""

    def __init__(self, vocab_size):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, 16)   # rank 16: a full V x V table takes a second to initialise
        self.unembed = torch.nn.Linear(16, vocab_size)
        self.outputs, self.alive_at_call = [], []

    def forward(self, idx):
        self.alive_at_call.append(sum(ref() is not None for ref in self.outputs))
        logits = self.unembed(self.embed(idx)).float()
        self.outputs.append(weakref.ref(logits))
        return logits


def test_evaluation_holds_one_batch_of_logits_at_a_time(harness):
    tok = harness.Tokenizer.from_directory()
    model = LiveLogits(tok.get_vocab_size())
    harness.evaluate_bpb(model, tok, 4)
    n_rows = harness.EVAL_TOKENS // harness.MAX_SEQ_LEN
    n_batches = -(-n_rows // 4) + min(4, -(-n_rows // 4)) + -(-(n_rows // 4) // 4)   # validation, 4 probes, test
    assert len(model.alive_at_call) == n_batches
    assert model.alive_at_call == [0] * n_batches  # on main: the previous batch's logits were alive


def test_steady_state_mfu_counts_step_minus_10_as_the_reference():
    # 21 steps, the first 11 untimed: the reference divides by 21 - 10 = 11 steps' worth of FLOPs
    assert prepare.UNTIMED_STEPS == 11
    assert prepare.steady_state_mfu(1e12, 21, 10.0, 1e12) == pytest.approx(110.0)
    assert prepare.steady_state_mfu(1e12, 21, 10.0, None) is None


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.5e12), ("NVIDIA H100 NVL", 835.5e12),
                                        ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989.5e12),
                                        ("NVIDIA H200 NVL", 835.5e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("NVIDIA GeForce RTX 4090", 165.2e12), ("Tesla T4", None)])
def test_gpu_peak_flops(name, peak):
    assert prepare.gpu_peak_flops(name) == peak


def test_warm_up_step_count_is_the_harness_constant_not_a_literal():
    src = TRAIN.read_text()
    loop = src[src.index("# Training loop"):src.index("# Summary")]
    assert not re.search(r"step\W{1,4}1[01]\b|\b1[01] untimed", loop), "the count is prepare.UNTIMED_STEPS"
    assert loop.count("UNTIMED_STEPS") >= 3

# ---------------------------------------------------------------------------
# The allocator setting, and no silent death without a GPU


ALLOC = "import os, prepare; print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'), os.environ.get('PYTORCH_ALLOC_CONF'))"


@pytest.mark.parametrize("user, expected", [({}, "expandable_segments:True expandable_segments:True"),
                                            ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"},
                                             "expandable_segments:False None"),
                                            ({"PYTORCH_ALLOC_CONF": "max_split_size_mb:64"}, "None max_split_size_mb:64")])
def test_allocator_setting_is_set_on_import_unless_the_user_set_one(tmp_path, user, expected):
    env = {k: v for k, v in subprocess_env(tmp_path).items() if "ALLOC_CONF" not in k}
    proc = subprocess.run([sys.executable, "-c", ALLOC], env={**env, **user}, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.strip() == expected, proc.stderr[-2000:]
    assert TRAIN.read_text().index("from prepare import") < TRAIN.read_text().index("torch.cuda")  # before CUDA


@pytest.mark.slow
def test_without_a_gpu_train_py_refuses_in_one_line_and_allocates_nothing_big(tmp_path):
    """The unmodified train.py, no step budget, no GPU: it stops before reading data or building the model."""
    env = subprocess_env(tmp_path / "empty-cache")  # not even a cache: the GPU is checked first
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(TRAIN)], cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
        deadline = time.monotonic() + 120  # an upper bound for a hang only
        while not (waited := os.wait4(proc.pid, os.WNOHANG))[0] and time.monotonic() < deadline:
            time.sleep(0.1)
        if not waited[0]:
            proc.kill()
            pytest.fail("train.py without a GPU did not stop")
    _, status, usage = waited  # wait4: the child's own peak memory
    out, err = out.read_text(), err.read_text()
    assert os.waitstatus_to_exitcode(status) == 1, out + err
    assert usage.ru_maxrss < 2 * 1024**2  # KiB: importing torch, no model (on main the CPU run reached 22.9 GB)
    line = one_line(err)
    assert "no CUDA GPU found" in line and "uv run prepare.py --smoke" in line
    assert "Traceback" not in err and not out.strip()


def test_smoke_without_a_prepared_cache_says_to_prepare(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "prepare.py"), "--smoke"], cwd=ROOT, text=True,
                          env=subprocess_env(tmp_path / "empty-cache"), capture_output=True, timeout=120)
    fails_in_one_line(proc, "needs a prepared cache", "run `uv run prepare.py`")

# ---------------------------------------------------------------------------
# The smoke run, and the script's fast fail (subprocesses against the tiny cache)

SUMMARY = [("val_bpb", r"\d+\.\d{6}"), ("training_seconds", r"\d+\.\d"), ("total_seconds", r"\d+\.\d"),
           ("peak_vram_mb", r"\d+\.\d"), ("mfu_percent", r"\d+\.\d\d|unknown"), ("total_tokens_M", r"\d+\.\d"),
           ("num_steps", r"\d+"), ("num_params_M", r"\d+\.\d"), ("depth", r"\d+"), ("dataset", r"\S+"),
           ("attention", r"\S+")]


def read_summary(lines):
    """The summary block at the end of a log: `---`, then SPEC's 9 keys, `dataset` and `attention`, one column."""
    assert [key for key, _ in SUMMARY] == list(SUMMARY_KEYS)   # the keys every reader of the block uses
    assert lines[-len(SUMMARY) - 1] == "---"
    summary = {}
    for line, (key, fmt) in zip(lines[-len(SUMMARY):], SUMMARY):
        assert re.fullmatch(rf"{key}:\s+({fmt})", line) and line.index(line.split()[1]) == 18, line
        summary[key] = line.split()[1]
    return summary


# The agent's edit, in the one smoke run below: a GPU that holds at most 2 sequences per micro-step, and the
# gradients of the first step saved with the weights they were taken at
FORWARD = '    def forward(self, idx, targets=None, reduction="mean"):\n'
AT_MOST_2 = ('        if idx.size(0) > 2:\n'
             '            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")\n')
STEP = "    optimizer.step()\n"
SAVE_FIRST_STEP = ('    if step == 0:\n'
                   '        torch.save(dict(config=vars(model.config), weights=model.state_dict(),\n'
                   '                        grads={n: p.grad for n, p in model.named_parameters()}), "first_step.pt")\n')


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, tiny_cache):
    """`prepare.py --smoke > run.log` beside a train.py with the agent's edit: that train.py, at toy size, to its
    summary block. One run, read by the three tests below."""
    directory = tmp_path_factory.mktemp("smoke")
    for name in ("prepare.py", "train.py"):
        shutil.copy(ROOT / name, directory / name)
    shutil.copytree(ROOT / "harness", directory / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    src = (directory / "train.py").read_text()
    assert src.count(FORWARD) == 1 and src.count(STEP) == 1
    (directory / "train.py").write_text(src.replace(FORWARD, FORWARD + AT_MOST_2).replace(STEP, SAVE_FIRST_STEP + STEP))
    env = subprocess_env(tiny_cache)
    env.pop("PYTHONPATH")
    with open(directory / "run.log", "wb") as log:
        code = subprocess.run([sys.executable, str(directory / "prepare.py"), "--smoke"], cwd=directory, env=env,
                              stdout=log, stderr=subprocess.STDOUT, timeout=400).returncode
    raw = (directory / "run.log").read_bytes()
    assert code == 0, raw.decode()[-3000:]
    return directory, raw


@pytest.mark.slow
def test_smoke_run_trains_the_current_train_py_through_the_harness(smoke_run, tiny_cache):
    directory, raw = smoke_run
    text = raw.decode()
    assert b"\r" not in raw  # redirected: ordinary lines, no in-place progress line
    lines = text.splitlines()
    assert lines[0].startswith(f"smoke: {directory / 'train.py'} at toy size")
    assert lines[1].startswith("device: cpu") and lines[2].startswith("attention kernel: ")
    for key in SUMMARY_KEYS:   # program.md greps `^key:`: each summary key starts exactly one line of the log
        assert sum(line.startswith(f"{key}:") for line in lines) == 1, key
    record = json.loads((directory / "evaluations.jsonl").read_text().splitlines()[-1])   # the harness's, marked
    assert record["smoke"] is True and record["train_py"] == str((directory / "train.py").resolve())
    assert "DEVICE_BATCH_SIZE = 4 runs out of GPU memory: using 2" in text   # the edited train.py ran
    assert any(line.startswith("step 00000 ") for line in lines)
    summary = read_summary(lines)
    assert summary["depth"] == str(smoke.SMOKE_SIZE["DEPTH"]) and summary["attention"] == "sdpa-cpu"
    assert summary["mfu_percent"] == "unknown" and summary["peak_vram_mb"] == "0.0"
    assert summary["dataset"] == "local:" + str(tiny_cache.parent / "corpus")  # the tiny cache came from --source
    steps = int(summary["num_steps"])
    assert steps == smoke.SMOKE_UNTIMED_STEPS + smoke.SMOKE_STEPS  # the untimed warm-up steps, then the step budget
    # one count, in steps, where the budget is steps: the budget line, the progress lines and the summary agree
    assert f"budget: {steps} steps: 1 untimed warm-up step, then {smoke.SMOKE_STEPS} timed " in text
    progress = [line for line in lines if line.startswith("step ")]
    assert progress[-1].endswith("remaining: 0 steps") and all(line.endswith(" steps") for line in progress)

    # program.md's grep finds it, and it is the number the harness recorded (whatever a toy learns in 4 steps)
    grep = subprocess.run(["grep", "^val_bpb:", str(directory / "run.log")], capture_output=True, text=True)
    assert grep.stdout.split()[1] == f"{record['val_bpb']:.6f}" and 0 < record["val_bpb"] < math.inf


@pytest.mark.slow
def test_out_of_memory_halves_the_device_batch_and_keeps_the_tokens_per_step(smoke_run):
    text = smoke_run[1].decode()
    total = smoke.SMOKE_SIZE["TOTAL_BATCH_SIZE"]
    assert "DEVICE_BATCH_SIZE = 4 runs out of GPU memory: using 2" in text
    assert f"{total // (2 * smoke.SMOKE_SEQ_LEN)} micro-steps of 2 x {smoke.SMOKE_SEQ_LEN} tokens per step" in text
    summary = read_summary(text.splitlines())
    assert float(summary["total_tokens_M"]) == pytest.approx(round(int(summary["num_steps"]) * total / 1e6, 1))


@pytest.mark.slow
def test_gradient_accumulation_gives_the_gradient_of_the_whole_step(smoke_run, tr, harness):
    """train.py's first step, in 2-sequence micro-steps, against one backward over all of the step's sequences."""
    first = torch.load(smoke_run[0] / "first_step.pt")
    model = tr.GPT(tr.GPTConfig(**first["config"]))
    model.load_state_dict(first["weights"])
    tok = harness.Tokenizer.from_directory()
    n_rows = smoke.SMOKE_SIZE["TOTAL_BATCH_SIZE"] // smoke.SMOKE_SEQ_LEN   # the rows the loader gave, in order
    x, y, _ = next(harness.make_dataloader(tok, n_rows, smoke.SMOKE_SEQ_LEN, "train", device="cpu"))
    model(x, y).backward()   # the mean loss over the whole step: what the micro-steps must add up to
    for name, p in model.named_parameters():
        torch.testing.assert_close(first["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_nan_loss_prints_fail_and_exits_1(tmp_path, tiny_cache):
    path = toy_train_py(tmp_path, MATRIX_LR='float("nan")')  # a bad edit: every update is NaN
    code, log = run_script(path, tiny_cache, tmp_path / "run.log")
    text = log.decode()
    assert code == 1, text[-2000:]
    assert text.splitlines()[-1] == "FAIL"
    assert "loss nan at step 1" in text and "val_bpb" not in text
