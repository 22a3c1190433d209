"""A character-level causal language model on causal linear attention that decodes in O(1) per token.

The text is the source of Python's own `argparse` module (on every CPython install). Two models of the same size
and layout are trained: one with hk.nn.LinearSelfAttention (feature map elu(x) + 1, normalized), one with softmax
attention. The linear one then generates token by token from its recurrent state (hk.causal_linear_attention_step:
a fixed-size state per layer, the same work for every token) and the example checks that the logits it produced
equal those of one full causal pass over the generated text. Last, it times one generated token as the context
grows: the softmax model reads a KV cache that grows with the context, the linear model a state that does not.
"""

from __future__ import annotations

import argparse as argparse_module
import math
from pathlib import Path

import _common
import torch
import torch.nn.functional as F
from torch import nn

import hadamard_kernels as hk

SHIFT = 4  # each position sees the embeddings of its last SHIFT tokens (attention alone has no notion of order)


def load_text() -> str:
    return Path(argparse_module.__file__).read_text(encoding="utf-8")


class SoftmaxSelfAttention(nn.Module):
    """Causal softmax attention with the same projections as hk.nn.LinearSelfAttention, and a KV cache."""

    def __init__(self, hidden_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.W_q, self.W_k, self.W_v = (nn.Linear(hidden_dim, hidden_dim) for _ in range(3))

    def _heads(self, x):  # [B, T, C] -> [B, H, T, C / H]
        return [w(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for w in (self.W_q, self.W_k, self.W_v)]

    def forward(self, x, output_final_state=False, room=0):
        """With output_final_state also the KV cache (keys, values, length), with room for `room` more tokens
        that step() writes in place."""
        q, k, v = self._heads(x)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        if not output_final_state:
            return out
        cache_k = k.new_zeros(*k.shape[:2], k.shape[2] + room, k.shape[3])
        cache_v = torch.zeros_like(cache_k)
        cache_k[:, :, :k.shape[2]], cache_v[:, :, :k.shape[2]] = k, v
        return out, (cache_k, cache_v, k.shape[2])

    def step(self, x_t, state):
        q, k, v = self._heads(x_t)
        cache_k, cache_v, n = state
        cache_k[:, :, n:n + 1], cache_v[:, :, n:n + 1] = k, v
        out = F.scaled_dot_product_attention(q, cache_k[:, :, :n + 1], cache_v[:, :, :n + 1])
        return out.transpose(1, 2).flatten(2), (cache_k, cache_v, n + 1)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, attention: str):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        if attention == "linear":
            self.attn = hk.nn.LinearSelfAttention(dim, num_heads=heads, feature_map="elu1", normalize=True)
        else:
            self.attn = SoftmaxSelfAttention(dim, heads)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, state=None, output_final_state=False, room=0):
        """state: decode one step from it; output_final_state: a full pass that returns the state."""
        h = self.norm1(x)
        if state is not None:
            a, state = self.attn.step(h, state)
        elif output_final_state:
            kwargs = {"room": room} if isinstance(self.attn, SoftmaxSelfAttention) else {}
            a, state = self.attn(h, output_final_state=True, **kwargs)
        else:
            a = self.attn(h)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x)), state


class CharLM(nn.Module):
    """Token-shift embeddings, `layers` pre-norm blocks (attention + MLP), a linear head."""

    def __init__(self, vocab: int, dim: int, heads: int, layers: int, attention: str):
        super().__init__()
        self.embed = nn.ModuleList(nn.Embedding(vocab, dim) for _ in range(SHIFT))
        self.blocks = nn.ModuleList(Block(dim, heads, attention) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def _embed(self, tokens):  # tokens [B, T], earlier tokens first -> [B, T - SHIFT + 1, C]
        T = tokens.shape[1] - SHIFT + 1
        return sum(emb(tokens[:, SHIFT - 1 - i:SHIFT - 1 - i + T]) for i, emb in enumerate(self.embed))

    def forward(self, tokens, output_final_state=False, room=0):
        """Logits for positions SHIFT-1.. of tokens [B, T]; with output_final_state also the per-layer states
        (room: how many tokens the softmax model's KV cache must have room for)."""
        x, new_states = self._embed(tokens), []
        for block in self.blocks:
            x, state = block(x, None, output_final_state, room)
            new_states.append(state)
        logits = self.head(self.norm(x))
        return (logits, new_states) if output_final_state else logits

    def step(self, last_tokens, states):
        """Logits of the next token from the last SHIFT tokens [B, SHIFT] and the per-layer states."""
        x, new_states = self._embed(last_tokens), []
        for block, state in zip(self.blocks, states):
            x, state = block(x, state)
            new_states.append(state)
        return self.head(self.norm(x))[:, -1], new_states


def set_backend(model: CharLM, backend: str | None) -> None:
    for block in model.blocks:
        if isinstance(block.attn, hk.nn.LinearSelfAttention):
            block.attn.backend = backend


def train(model, data, steps, batch, seq, lr, seed, device) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    losses = []
    for _ in range(steps):
        start = torch.randint(0, len(data) - seq - SHIFT, (batch,), generator=gen)
        chunk = torch.stack([data[s:s + seq + SHIFT] for s in start.tolist()]).to(device)
        logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, SHIFT:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate(model, data, seq, device) -> float:
    """Mean cross-entropy (nats per character) over consecutive windows of held-out text."""
    windows = [data[s:s + seq + SHIFT] for s in range(0, len(data) - seq - SHIFT, seq)]
    chunk = torch.stack(windows).to(device)
    return F.cross_entropy(model(chunk[:, :-1]).flatten(0, 1), chunk[:, SHIFT:].flatten()).item()


@torch.no_grad()
def generate(model, prompt, n, temperature, seed):
    """Prefill the prompt [1, P] with one causal pass (keeping the states), then sample n tokens one at a time from
    the states. Returns (all tokens [1, P + n], the logits each decoding step saw [n, V])."""
    logits, states = model(prompt, output_final_state=True, room=n)
    gen = torch.Generator(device=prompt.device).manual_seed(seed)
    tokens, seen = prompt, []
    next_logits = logits[:, -1]
    for _ in range(n):
        seen.append(next_logits[0])
        token = torch.multinomial(F.softmax(next_logits / temperature, -1), 1, generator=gen)
        tokens = torch.cat([tokens, token], 1)
        next_logits, states = model.step(tokens[:, -SHIFT:], states)
    return tokens, torch.stack(seen)


@torch.no_grad()
def decode_ms(model, context, tokens_timed, device) -> float:
    """ms per generated token, the fastest of `tokens_timed` steps, after `context` tokens [1, T]. The linear
    model prefills them (one causal pass that keeps its states); the softmax model gets a KV cache of T random
    entries per layer instead of a T x T prefill, since the cost of a decoding step depends on the cache's length,
    not on its values."""
    if isinstance(model.blocks[0].attn, SoftmaxSelfAttention):
        dim, heads, T = model.head.in_features, model.blocks[0].attn.num_heads, context.shape[1]
        gen = torch.Generator(device=context.device).manual_seed(0)
        states = [tuple(torch.randn(1, heads, T + tokens_timed + 2, dim // heads, device=context.device,
                                    generator=gen) for _ in range(2)) + (T,) for _ in model.blocks]
    else:
        _, states = model(context, output_final_state=True)
    last = context[:, -SHIFT:]
    for _ in range(2):  # warm-up: the first steps pay for one-time setup
        logits, states = model.step(last, states)
    times = []
    for _ in range(tokens_timed):
        watch = _common.Stopwatch(device)
        watch.start()
        logits, states = model.step(last, states)
        watch.stop()
        times.append(watch.ms)
    return min(times)  # the fastest step: the cost of the step itself, without a busy machine's stalls


def main():
    args = _common.parse_args(__doc__)
    device = args.device
    if args.smoke:
        dim, heads, layers, seq, batch, steps, n_gen, contexts = 32, 2, 1, 32, 8, 40, 6, [64, 1024, 16384]
    elif args.quick:
        dim, heads, layers, seq, batch, steps, n_gen, contexts = 64, 4, 2, 64, 16, 300, 24, [64, 512, 4096, 32768]
    else:
        dim, heads, layers, seq, batch, steps, n_gen, contexts = (256, 4, 4, 256, 32, 3000, 200,
                                                                  [256, 2048, 16384, 131072])
    text = load_text()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    data = torch.tensor([index[c] for c in text])
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    if args.quick:
        val_data = val_data[:4096]
    print(f"text: argparse.py, {len(text)} characters, {len(vocab)} symbols; model dim {dim}, {heads} heads, "
          f"{layers} layers; {steps} AdamW steps of {batch} x {seq} characters; device {_common.device_label(device)}")

    summary, models = {}, {}
    for attention in ("linear", "softmax"):
        torch.manual_seed(args.seed)
        model = CharLM(len(vocab), dim, heads, layers, attention).to(device)
        watch = _common.Stopwatch(device)
        watch.start()
        losses = train(model, train_data, steps, batch, seq, 3e-3, args.seed, device)
        watch.stop()
        model.eval()
        val = evaluate(model, val_data, seq, device)
        summary[f"{attention}_val_bpc"] = val / math.log(2)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{attention:7s} attention: {n_params} parameters, final train loss {losses[-1]:.3f}, held-out "
              f"{val / math.log(2):.3f} bits per character, {watch.total:.1f} s of training")
        models[attention] = model

    # Decoding one token at a time gives the logits of one full causal pass: the linear model from its state on
    # every backend that runs here, the softmax model from its KV cache.
    lm = models["linear"]
    prompt = val_data[:seq].to(device)[None]
    runs = [("linear", b) for b in ("reference", *_common.fused_backends(device))] + [("softmax", None)]
    for attention, backend in runs:
        model = models[attention]
        set_backend(model, backend)
        interpreted = backend not in (None, "reference") and device.type == "cpu"
        n = min(n_gen, 6) if interpreted else n_gen  # the Triton interpreter: a few tokens are enough
        tokens, step_logits = generate(model, prompt, n, 0.8, args.seed)
        with torch.no_grad():
            full_logits = model(tokens)[0, seq - SHIFT:seq - SHIFT + n]
        diff = ((step_logits - full_logits).abs().max() / full_logits.abs().max()).item()
        name = f"{attention}_{backend}" if backend else attention
        summary[f"decode_vs_full_{name}"] = diff
        print(f"{name}: {n} tokens decoded one at a time; largest |step logit - full-pass logit| / max |logit| = "
              f"{diff:.1e}")
        if backend == "reference":
            sample = "".join(vocab[i] for i in tokens[0, seq:].tolist())
            print(f"--- prompt ...{''.join(vocab[i] for i in prompt[0, -40:].tolist())!r}\n--- sampled {sample!r}")
    set_backend(lm, None)

    # Time per generated token as the context grows (one sequence; random context tokens: the cost does not
    # depend on the values).
    timed = 16 if args.smoke else 32
    timed_backends = _common.fused_backends(device) if device.type == "cuda" else ["reference"]
    ms = {f"linear ({b})": [] for b in timed_backends}
    ms["softmax (KV cache)"] = []
    gen = torch.Generator().manual_seed(args.seed)
    for context in contexts:
        ctx = torch.randint(0, len(vocab), (1, context), generator=gen).to(device)
        for backend in timed_backends:
            set_backend(lm, backend)
            ms[f"linear ({backend})"].append(decode_ms(lm, ctx, timed, device))
        ms["softmax (KV cache)"].append(decode_ms(models["softmax"], ctx, timed, device))
        print(f"context {context:6d}: ms per generated token on {_common.device_label(device)}: "
              + ", ".join(f"{k} {v[-1]:.3f}" for k, v in ms.items()))
    set_backend(lm, None)
    lin = ms[f"linear ({timed_backends[0]})"]
    soft = ms["softmax (KV cache)"]
    summary.update(decode_ms_linear_first=lin[0], decode_ms_linear_last=lin[-1], decode_ms_softmax_first=soft[0],
                   decode_ms_softmax_last=soft[-1])

    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, values in ms.items():
        ax.plot(contexts, values, "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"ms per generated token (fastest of {timed})")
    where = _common.device_label(device) + (" (plain PyTorch: the reference backend)" if device.type == "cpu" else "")
    ax.set_title(f"Decoding a {layers}-layer, dim-{dim} char LM on {where}\n"
                 f"held-out bits/char: linear {summary['linear_val_bpc']:.2f}, "
                 f"softmax {summary['softmax_val_bpc']:.2f}", fontsize=10)
    ax.legend()
    path = _common.save_figure(fig, args.out, "linear_attention_lm")
    print(f"saved {path}")
    _common.result("linear_attention_lm", device=device.type, **summary, png=path)


if __name__ == "__main__":
    main()
