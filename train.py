"""
Train a small GPT for a fixed 5-minute budget on one GPU, then score it with val_bpb.

    uv run train.py

This is the file the agent edits. It holds the whole model, the Muon+AdamW optimizer,
the training loop and the summary block that program.md greps. With no CUDA GPU it
stops at once; `uv run prepare.py --smoke` runs it at toy size on the CPU.
"""

import gc
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from prepare import (DATASET, MAX_SEQ_LEN, UNTIMED_STEPS, Tokenizer, budget_description, budget_left, evaluate_bpb,
                     fit_device_batch, gpu_peak_flops, load_attention, make_dataloader, require_gpu, steady_state_mfu,
                     training_progress)

# ---------------------------------------------------------------------------
# GPT model


@dataclass
class GPTConfig:
    sequence_len: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int
    window_pattern: str


def norm(x):
    """RMS norm with no learned scale."""
    return F.rms_norm(x, (x.size(-1),))


def has_value_embed(layer_idx, n_layer):
    """Value embeddings on alternating layers, the last layer always included."""
    return layer_idx % 2 == (n_layer - 1) % 2


def window_sizes(config):
    """Attention window per layer from the S/L pattern: L = the full sequence, S = half; the last layer is L."""
    long = config.sequence_len
    sizes = [{"L": long, "S": long // 2}[config.window_pattern[i % len(config.window_pattern)].upper()]
             for i in range(config.n_layer)]
    sizes[-1] = long
    return sizes


def rotary_cos_sin(seq_len, head_dim, device, base=10000):
    """RoPE tables, (1, seq_len, 1, head_dim/2); bf16 on the GPU as in the reference."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    dtype = torch.bfloat16 if freqs.device.type == "cuda" else torch.float32
    return freqs.cos().to(dtype)[None, :, None, :], freqs.sin().to(dtype)[None, :, None, :]


def apply_rotary_emb(x, cos, sin):
    """Rotate the two halves of the head dimension against each other. x: (B, T, H, D)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        # Value-embedding gate, one per head from the first 32 channels; zero init makes it start at 1
        self.ve_gate = nn.Linear(32, self.n_kv_head, bias=False) if has_value_embed(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos_sin, window):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value residual (ResFormer): mix this layer's value embedding into v
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :32]))  # (B, T, H)
            v = v + gate.unsqueeze(-1) * ve.view_as(v)
        cos, sin = cos_sin
        q, k = norm(apply_rotary_emb(q, cos, sin)), norm(apply_rotary_emb(k, cos, sin))  # RoPE, then QK-norm
        y = fa3.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))  # set up once by the harness
        return self.c_proj(y.contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window):
        x = x + self.attn(norm(x), ve, cos_sin, window)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.window_sizes = window_sizes(config)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied from wte
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))  # per-layer scale of the residual stream
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))  # per-layer mix of the embedding x0
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim)
                                           for i in range(config.n_layer) if has_value_embed(i, config.n_layer)})
        self.rotary_seq_len = 10 * config.sequence_len
        cos, sin = rotary_cos_sin(self.rotary_seq_len, config.n_embd // config.n_head, self.lm_head.weight.device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self):
        s = 3**0.5 * self.config.n_embd**-0.5  # uniform(-s, s) has std 1/sqrt(n_embd)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(linear.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)  # each block starts as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        head_dim = self.config.n_embd // self.config.n_head
        self.cos, self.sin = rotary_cos_sin(self.rotary_seq_len, head_dim, self.cos.device)
        if self.transformer.wte.weight.is_cuda:  # the embedding tables are stored in bf16 on the GPU
            self.transformer.wte.to(dtype=torch.bfloat16)
            self.value_embeds.to(dtype=torch.bfloat16)

    def estimate_flops(self):
        """Training FLOPs per token: 6 per matmul weight (embedding tables and scalars excluded) plus attention."""
        n_excluded = (self.transformer.wte.weight.numel() + sum(ve.weight.numel() for ve in self.value_embeds.values())
                      + self.resid_lambdas.numel() + self.x0_lambdas.numel())
        n_matmul = sum(p.numel() for p in self.parameters()) - n_excluded
        head_dim = self.config.n_embd // self.config.n_head
        attn = sum(12 * self.config.n_head * head_dim * min(w, self.config.sequence_len) for w in self.window_sizes)
        return 6 * n_matmul + attn

    def setup_optimizer(self, unembedding_lr, embedding_lr, matrix_lr, weight_decay, adam_betas, scalar_lr):
        model_dim = self.config.n_embd
        s = (model_dim / 768) ** -0.5  # AdamW lrs were tuned at width 768
        print(f"AdamW lr scale (model_dim/768)^-0.5 = {s:.6f}")
        adamw = dict(kind="adamw", betas=adam_betas, eps=1e-10, weight_decay=0.0)
        param_groups = [
            dict(adamw, params=[self.lm_head.weight], lr=unembedding_lr * s),
            dict(adamw, params=[self.transformer.wte.weight], lr=embedding_lr * s),
            dict(adamw, params=list(self.value_embeds.parameters()), lr=embedding_lr * s),
            dict(adamw, params=[self.resid_lambdas], lr=scalar_lr * 0.01),
            dict(adamw, params=[self.x0_lambdas], lr=scalar_lr, betas=(0.96, 0.95)),
        ]
        matrices = list(self.transformer.h.parameters())
        for shape in sorted({p.shape for p in matrices}):  # one Muon group per shape, updated stacked
            param_groups.append(dict(kind="muon", params=[p for p in matrices if p.shape == shape], lr=matrix_lr,
                                     momentum=0.95, beta2=0.95, weight_decay=weight_decay))
        grouped = [id(p) for group in param_groups for p in group["params"]]
        missing = [name for name, p in self.named_parameters() if grouped.count(id(p)) != 1]
        assert not missing, f"every parameter must be in exactly one optimizer group, not so: {', '.join(missing)}"
        optimizer = MuonAdamW(param_groups)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    def forward(self, idx, targets=None, reduction="mean"):
        B, T = idx.size()
        cos_sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.transformer.wte(idx))  # (B, T, C)
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i])
        logits = self.lm_head(norm(x)).float()
        logits = 15 * torch.tanh(logits / 15)  # soft cap at +-15
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), ignore_index=-1, reduction=reduction)

# ---------------------------------------------------------------------------
# Optimizer: MuonAdamW (AdamW for embeddings, head and scalars; Muon for the block matrices)

# Polar Express (Amsel et al., 2025): per-step (a, b, c) of the odd polynomial a*X + b*X^3 + c*X^5
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def adamw_step(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, wd):
    """One AdamW update in place; every hyperparameter is a 0-dim tensor, so new values never recompile."""
    p.mul_(1 - lr * wd)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2)
    denom = (exp_avg_sq / (1 - beta2**step)).sqrt() + eps
    p.sub_(lr / (1 - beta1**step) * exp_avg / denom)


def polar_express(G):
    """Approximately orthogonalise a stack of matrices (..., rows, cols) in bf16: singular values -> ~1."""
    X = G.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    tall = X.size(-2) > X.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        A = X.mT @ X if tall else X @ X.mT  # the smaller Gram matrix
        B = b * A + c * (A @ A)
        X = a * X + (X @ B if tall else B @ X)
    return X


def muon_step(grads, params, momentum_buffer, second_momentum_buffer, momentum, lr, wd, beta2):
    """One Muon update of a stack of same-shape matrices (N, rows, cols) in place; hyperparameters: 0-dim tensors."""
    # Nesterov momentum
    momentum_buffer.lerp_(grads, 1 - momentum)
    g = grads.lerp(momentum_buffer, momentum)
    g = polar_express(g).float()
    # NorMuon: scale each row (rows >= cols) or column by the inverse root of an EMA of its mean square,
    # then rescale so that the update keeps its total norm
    red_dim = -1 if g.size(-2) >= g.size(-1) else -2
    v = g.square().mean(dim=red_dim, keepdim=True)
    second_momentum_buffer.lerp_(v, 1 - beta2)
    scale = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    scaled = (v * scale.square()).sum(dim=(-2, -1), keepdim=True).clamp_min(1e-10)
    norm_ratio = v.sum(dim=(-2, -1), keepdim=True) / scaled
    g = g * (scale * norm_ratio.sqrt())
    # Cautious weight decay: decay only the weights whose update agrees in sign with them
    params.sub_(lr * g + lr * wd * params * (g * params >= 0))


class MuonAdamW(torch.optim.Optimizer):
    """Param groups carry kind="adamw" (lr, betas, eps, weight_decay) or "muon" (lr, momentum, beta2, weight_decay)."""

    def __init__(self, param_groups):
        super().__init__(param_groups, defaults={})
        # The update rules are compiled once on the GPU (fullgraph, static shapes). On the CPU they run
        # eagerly: inductor's CPU backend needs a C++ toolchain and would dominate a toy run.
        on_gpu = self.param_groups[0]["params"][0].is_cuda
        maybe_compile = lambda f: torch.compile(f, dynamic=False, fullgraph=True) if on_gpu else f
        self.adamw_step, self.muon_step = maybe_compile(adamw_step), maybe_compile(muon_step)
        # Hyperparameters reach the compiled steps as 0-dim CPU tensors: a new value is not a new graph
        self.hparams = {k: torch.tensor(0.0) for k in ("step", "lr", "beta1", "beta2", "eps", "wd", "momentum")}

    def _set(self, **values):
        for k, val in values.items():
            self.hparams[k].fill_(val)
        return self.hparams

    def _step_adamw(self, group):
        beta1, beta2 = group["betas"]
        h = self._set(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], wd=group["weight_decay"])
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            h["step"].fill_(state["step"])
            self.adamw_step(p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                            h["step"], h["lr"], h["beta1"], h["beta2"], h["eps"], h["wd"])

    def _step_muon(self, group):
        params = group["params"]
        if params[0].grad is None:
            return
        rows, cols = params[0].shape
        state = self.state[params[0]]  # the whole group's state lives with its first parameter
        if not state:
            state["momentum_buffer"] = torch.zeros(len(params), rows, cols, device=params[0].device)
            stat_shape = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
            state["second_momentum_buffer"] = torch.zeros(stat_shape, device=params[0].device)
        h = self._set(lr=group["lr"] * max(1.0, rows / cols) ** 0.5, momentum=group["momentum"],
                      wd=group["weight_decay"], beta2=group["beta2"])
        stacked = torch.stack(params)
        self.muon_step(torch.stack([p.grad for p in params]), stacked, state["momentum_buffer"],
                       state["second_momentum_buffer"], h["momentum"], h["lr"], h["wd"], h["beta2"])
        torch._foreach_copy_(params, list(stacked.unbind(0)))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._step_adamw(group)
            else:
                self._step_muon(group)

# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly, no CLI flags needed)

# Model size
DEPTH = 8                    # transformer blocks: the one dial that sizes the model
ASPECT_RATIO = 64            # model_dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128               # channels per attention head
WINDOW_PATTERN = "SSSL"      # attention window per layer, repeated: L = full context, S = half (last layer always L)

# Batch
TOTAL_BATCH_SIZE = 2**19     # ~524K tokens per optimizer step
DEVICE_BATCH_SIZE = 128      # sequences per micro-step; gradient accumulation makes up TOTAL_BATCH_SIZE

# Optimizer
EMBEDDING_LR = 0.6           # AdamW lr of the token and value embeddings (times (model_dim/768)^-0.5)
UNEMBEDDING_LR = 0.004       # AdamW lr of lm_head (times (model_dim/768)^-0.5)
MATRIX_LR = 0.04             # Muon lr of the block matrices (times max(1, rows/cols)^0.5)
SCALAR_LR = 0.5              # AdamW lr of x0_lambdas; resid_lambdas get 0.01 of it
WEIGHT_DECAY = 0.2           # Muon cautious weight decay, falling linearly to 0 over the run
ADAM_BETAS = (0.8, 0.95)     # AdamW (beta1, beta2)

# Schedule (fractions of TIME_BUDGET)
WARMUP_RATIO = 0.0           # linear lr warm-up
WARMDOWN_RATIO = 0.5         # linear lr warm-down at the end
FINAL_LR_FRAC = 0.0          # lr multiplier reached at the end of the warm-down

# ---------------------------------------------------------------------------
# Setup: device, attention kernel, tokenizer, model, optimizer, data

t_start = time.time()
torch.manual_seed(int(os.environ.get("SEED", 42)))  # 42; program.md's noise reruns set SEED=1, 2
require_gpu()  # no CUDA GPU: stop here in one line (a smoke or test run, with a step budget, goes on on the CPU)
if torch.cuda.is_available():
    device = torch.device("cuda")
    torch.set_float32_matmul_precision("high")  # TF32 matmuls
    autocast_ctx = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)
    gpu_name = torch.cuda.get_device_name()
    peak_flops = gpu_peak_flops(gpu_name)
    peak = f"{peak_flops / 1e12:.1f} TFLOP/s bf16 peak" if peak_flops else "not in GPU_PEAK_FLOPS: MFU unknown"
    print(f"device: cuda ({gpu_name}, {peak}), bf16 autocast, torch.compile")
else:
    device = torch.device("cpu")
    autocast_ctx = nullcontext()
    peak_flops = None
    print("device: cpu (no CUDA GPU found): float32, no torch.compile, MFU unknown; a smoke or test run")

tokenizer = Tokenizer.from_directory()
vocab_size = tokenizer.get_vocab_size()
model_dim = -(-DEPTH * ASPECT_RATIO // HEAD_DIM) * HEAD_DIM  # rounded up to a multiple of HEAD_DIM
config = GPTConfig(sequence_len=MAX_SEQ_LEN, vocab_size=vocab_size, n_layer=DEPTH, n_head=model_dim // HEAD_DIM,
                   n_kv_head=model_dim // HEAD_DIM, n_embd=model_dim, window_pattern=WINDOW_PATTERN)
fa3 = load_attention(device, HEAD_DIM, window_sizes(config), MAX_SEQ_LEN)  # FA3 if it loads and checks out
print(f"attention kernel: {fa3.description}")
with torch.device("meta"):  # build without allocating, then materialise on the device and initialise
    model = GPT(config)
model.to_empty(device=device)
model.init_weights()
num_params = sum(p.numel() for p in model.parameters())
num_flops_per_token = model.estimate_flops()
print(f"model: {config}")
print(f"parameters: {num_params:,} | FLOPs per token: {num_flops_per_token:.4e} | windows: {model.window_sizes}")

optimizer = model.setup_optimizer(unembedding_lr=UNEMBEDDING_LR, embedding_lr=EMBEDDING_LR, matrix_lr=MATRIX_LR,
                                  weight_decay=WEIGHT_DECAY, adam_betas=ADAM_BETAS, scalar_lr=SCALAR_LR)
if device.type == "cuda":
    model = torch.compile(model, dynamic=False)

device_batch_size = fit_device_batch(model, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, autocast_ctx)  # halved until it fits
tokens_per_micro_step = device_batch_size * MAX_SEQ_LEN
assert TOTAL_BATCH_SIZE % tokens_per_micro_step == 0, f"TOTAL_BATCH_SIZE: not a multiple of {tokens_per_micro_step}"
grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_micro_step

train_loader = make_dataloader(tokenizer, device_batch_size, MAX_SEQ_LEN, "train", device=device)
x, y, epoch = next(train_loader)  # prefetch the first batch
print(f"budget: {budget_description()} | {grad_accum_steps} micro-steps of {device_batch_size} x {MAX_SEQ_LEN} "
      f"tokens per step")

# ---------------------------------------------------------------------------
# Schedules: driven by progress = training_seconds / TIME_BUDGET (see training_progress in prepare.py)


def get_lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    frac = (1.0 - progress) / WARMDOWN_RATIO  # 1 -> 0 over the warm-down
    return FINAL_LR_FRAC + (1.0 - FINAL_LR_FRAC) * frac


def get_muon_momentum(step):
    return 0.85 + 0.10 * min(step / 300, 1.0)  # 0.85 -> 0.95 over the first 300 steps


def get_weight_decay(progress):
    return WEIGHT_DECAY * (1.0 - progress)

# ---------------------------------------------------------------------------
# Training loop: stops once the timed steps add up to the budget


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


interactive = sys.stdout.isatty()  # a terminal gets one line rewritten in place; a log file gets a line every 5 s
last_print = 0.0
t_loop = time.time()
warmup_seconds = 0.0
training_seconds = 0.0
smooth_loss = 0.0
step = 0
while True:
    sync()
    t0 = time.time()
    for micro_step in range(grad_accum_steps):
        with autocast_ctx:
            loss = model(x, y)
        train_loss = loss.detach()
        (loss / grad_accum_steps).backward()
        x, y, epoch = next(train_loader)
    progress = training_progress(training_seconds, max(step - UNTIMED_STEPS, 0))
    lrm = get_lr_multiplier(progress)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = get_muon_momentum(step)
            group["weight_decay"] = get_weight_decay(progress)
    optimizer.step()
    model.zero_grad(set_to_none=True)
    train_loss_f = train_loss.item()
    if math.isnan(train_loss_f) or train_loss_f > 100:  # fast fail: the run diverged
        print(f"{chr(10) if interactive else ''}loss {train_loss_f} at step {step}: training diverged "
              f"(NaN or above 100); revert the change or lower the learning rates")
        print("FAIL")
        sys.exit(1)
    sync()
    dt = time.time() - t0
    if step >= UNTIMED_STEPS:  # the first steps compile and warm up: not timed
        training_seconds += dt
    else:
        warmup_seconds += dt
    done = step >= UNTIMED_STEPS and training_progress(training_seconds, step + 1 - UNTIMED_STEPS) >= 1.0

    smooth_loss = 0.9 * smooth_loss + 0.1 * train_loss_f
    debiased_loss = smooth_loss / (1 - 0.9 ** (step + 1))
    tok_per_sec = TOTAL_BATCH_SIZE / dt
    mfu = f"{100 * num_flops_per_token * tok_per_sec / peak_flops:.1f}%" if peak_flops else "unknown"
    line = (f"step {step:05d} ({100 * progress:.1f}%) | loss: {debiased_loss:.6f} | lrm: {lrm:.2f} | "
            f"dt: {dt * 1000:.0f}ms | tok/sec: {tok_per_sec:,.0f} | mfu: {mfu} | epoch: {epoch} | "
            f"remaining: {budget_left(training_seconds, max(step + 1 - UNTIMED_STEPS, 0))}")
    if interactive:
        print(f"\r{line}    ", end="", flush=True)
    elif done or time.time() - last_print >= 5:
        print(line, flush=True)
        last_print = time.time()

    if step == 0:  # Python's GC stalls ~500 ms at random: collect once, freeze what survives, then stop it
        gc.collect()
        gc.freeze()
        gc.disable()
    elif (step + 1) % 5000 == 0:
        gc.collect()
    step += 1
    if done:
        break
if interactive:
    print()

# ---------------------------------------------------------------------------
# Evaluation: the fixed metric from prepare.py

on_gpu = device.type == "cuda"
peak_train_mb = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else 0.0
if on_gpu:
    torch.cuda.reset_peak_memory_stats()  # from here on, the peak of evaluation alone
model.eval()
t_eval = time.time()
with autocast_ctx:
    val_bpb = evaluate_bpb(model, tokenizer, device_batch_size)
peak_eval_mb = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else 0.0
print(f"overhead: {t_loop - t_start:.1f}s start-up, {warmup_seconds:.1f}s in the {UNTIMED_STEPS} untimed warm-up "
      f"steps, {time.time() - t_eval:.1f}s evaluation")
print(f"memory: peak {peak_train_mb:.1f} MB in training, {peak_eval_mb:.1f} MB in evaluation")

# ---------------------------------------------------------------------------
# Summary (program.md greps these lines: keep the keys, order and format)

total_tokens = step * TOTAL_BATCH_SIZE
mfu = steady_state_mfu(num_flops_per_token * TOTAL_BATCH_SIZE, step, training_seconds, peak_flops)
mfu_percent = f"{mfu:.2f}" if mfu is not None else "unknown"
peak_vram_mb = max(peak_train_mb, peak_eval_mb)
print("---")
print(f"val_bpb:          {val_bpb:.6f}")
print(f"training_seconds: {training_seconds:.1f}")
print(f"total_seconds:    {time.time() - t_start:.1f}")
print(f"peak_vram_mb:     {peak_vram_mb:.1f}")
print(f"mfu_percent:      {mfu_percent}")
print(f"total_tokens_M:   {total_tokens / 1e6:.1f}")
print(f"num_steps:        {step}")
print(f"num_params_M:     {num_params / 1e6:.1f}")
print(f"depth:            {DEPTH}")
print(f"dataset:          {DATASET}")
print(f"attention:        {fa3.path}")
