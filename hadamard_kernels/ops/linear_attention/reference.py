"""The oracle for causal_linear_attention, in float32 (float64 stays float64).

With Q = phi(q), K = phi(k), per sequence and head: S_t = S_0 + sum_{s<=t} K_s^T v_s, z_t = z_0 + sum_{s<=t} K_s,
o_t = scale * Q_t S_t (normalize=False) or scale * Q_t S_t / (Q_t . z_t + eps) (normalize=True).

Computed chunk by chunk (64 tokens): inside a chunk the masked matrix form tril(Q_c K_c^T) V_c, across chunks the
running state, so long sequences never form a T x T matrix. The tests check it against the plain masked formula
((Q K^T) ∘ M) V and against the token-by-token recurrence. The normalizer is the same computation on v with a
column of ones appended (its state column is the key sum z). The backward is written out by hand (autograd does
not run inside a custom op's backward); gradcheck verifies it."""

from __future__ import annotations

import torch

from .common import state_dtype

CHUNK = 64


def phi(x, feature_map):
    if feature_map == "identity":
        return x
    if feature_map == "elu1":  # elu(x) + 1
        return torch.where(x > 0, x + 1, torch.exp(x))
    return torch.relu(x)


def phi_grad(x, feature_map):
    if feature_map == "identity":
        return torch.ones_like(x)
    if feature_map == "elu1":
        return torch.where(x > 0, torch.ones_like(x), torch.exp(x))
    return (x > 0).to(x.dtype)


def _sequences(q, cu_seqlens):
    """(state index n, batch index b, token slice) for every sequence."""
    if cu_seqlens is None:
        return [(b, b, slice(None)) for b in range(q.shape[0])]
    offsets = cu_seqlens.tolist()
    return [(n, 0, slice(start, end)) for n, (start, end) in enumerate(zip(offsets[:-1], offsets[1:]))]


def _core_forward(Q, K, V, S):
    """Q, K [T, H, Dk], V [T, H, Dv], S [H, Dk, Dv] -> (Q_t S_t for every t [T, H, Dv], S_T, chunk start states)."""
    out, starts = torch.empty(*Q.shape[:2], V.shape[-1], dtype=Q.dtype, device=Q.device), []
    for c in range(0, Q.shape[0], CHUNK):
        Qc, Kc, Vc = Q[c:c + CHUNK], K[c:c + CHUNK], V[c:c + CHUNK]
        scores = torch.einsum("thk,shk->hts", Qc, Kc).tril()
        out[c:c + CHUNK] = torch.einsum("hts,shv->thv", scores, Vc) + torch.einsum("thk,hkv->thv", Qc, S)
        starts.append(S)
        S = S + torch.einsum("thk,thv->hkv", Kc, Vc)
    return out, S, starts


def _core_backward(dout, dS, Q, K, V, starts):
    """Gradients of _core_forward: dout [T, H, Dv] for its output, dS [H, Dk, Dv] for S_T -> dQ, dK, dV, dS_0."""
    dQ, dK, dV = torch.empty_like(Q), torch.empty_like(K), torch.empty_like(V)
    for i in reversed(range(len(starts))):
        c = i * CHUNK
        Qc, Kc, Vc, dOc = Q[c:c + CHUNK], K[c:c + CHUNK], V[c:c + CHUNK], dout[c:c + CHUNK]
        scores = torch.einsum("thk,shk->hts", Qc, Kc).tril()
        dscores = torch.einsum("thv,shv->hts", dOc, Vc).tril()
        # dS is the gradient of the state at the chunk's end: it reaches K and V through S_end = S_start + K^T V.
        dQ[c:c + CHUNK] = torch.einsum("hts,shk->thk", dscores, Kc) + torch.einsum("thv,hkv->thk", dOc, starts[i])
        dK[c:c + CHUNK] = torch.einsum("hts,thk->shk", dscores, Qc) + torch.einsum("thv,hkv->thk", Vc, dS)
        dV[c:c + CHUNK] = torch.einsum("hts,thv->shv", scores, dOc) + torch.einsum("thk,hkv->thv", Kc, dS)
        dS = dS + torch.einsum("thk,thv->hkv", Qc, dOc)
    return dQ, dK, dV, dS


def _prepare(q, k, v, initial_state, initial_key_sum, feature_map, normalize, n):
    """Compute-dtype Q, K, the values (with a ones column when normalize) and initial states [n, H, Dk, Dv(+1)]."""
    compute = state_dtype(q.dtype)
    B, T, H, Dk = q.shape
    Q, K, V = phi(q.to(compute), feature_map), phi(k.to(compute), feature_map), v.to(compute)
    S0 = (initial_state.to(compute) if initial_state is not None
          else q.new_zeros((n, H, Dk, v.shape[-1]), dtype=compute))
    if normalize:
        V = torch.cat([V, V.new_ones((B, T, H, 1))], dim=-1)
        z0 = initial_key_sum.to(compute) if initial_key_sum is not None else S0.new_zeros((n, H, Dk))
        S0 = torch.cat([S0, z0[..., None]], dim=-1)
    return Q, K, V, S0


def _normalized(num_aug, scale, eps):
    """o (and den) from the augmented output [.., Dv + 1] whose last column is Q_t . z_t."""
    den = num_aug[..., -1] + eps
    return scale * num_aug[..., :-1] / den[..., None], den


def forward(q, k, v, initial_state, initial_key_sum, feature_map, normalize, scale, eps, output_final_state,
            cu_seqlens):
    """q, k [B, T, H, Dk], v [B, T, H, Dv], states [n, H, Dk, Dv] / [n, H, Dk] or None ->
    (o [B, T, H, Dv], final_state | None, final_key_sum | None)."""
    sequences = _sequences(q, cu_seqlens)
    Q, K, V, S0 = _prepare(q, k, v, initial_state, initial_key_sum, feature_map, normalize, len(sequences))
    out, final = torch.zeros_like(V), torch.empty_like(S0)
    for n, b, tokens in sequences:
        out[b, tokens], final[n], _ = _core_forward(Q[b, tokens], K[b, tokens], V[b, tokens], S0[n])
    o = _normalized(out, scale, eps)[0] if normalize else scale * out
    if not output_final_state:
        return o.to(q.dtype), None, None
    if normalize:
        # Copies, not views: a custom op's outputs must not alias each other.
        return o.to(q.dtype), final[..., :-1].clone(), final[..., -1].clone()
    return o.to(q.dtype), final, None


def backward(grad_o, grad_final_state, grad_final_key_sum, q, k, v, initial_state, initial_key_sum, feature_map,
             normalize, scale, eps, cu_seqlens, needs):
    sequences = _sequences(q, cu_seqlens)
    Q, K, V, S0 = _prepare(q, k, v, initial_state, initial_key_sum, feature_map, normalize, len(sequences))
    do = grad_o.to(Q.dtype)
    dS_final = (grad_final_state.to(Q.dtype) if grad_final_state is not None
                else S0.new_zeros(*S0.shape[:-1], v.shape[-1]))
    if normalize:
        # o = scale * num / den: d num = scale * do / den, d den = -(do . o) / den; den is the ones column.
        out = torch.zeros_like(V)
        for n, b, tokens in sequences:
            out[b, tokens] = _core_forward(Q[b, tokens], K[b, tokens], V[b, tokens], S0[n])[0]
        o, den = _normalized(out, scale, eps)
        dout = torch.cat([scale * do / den[..., None], (-(do * o).sum(-1) / den)[..., None]], dim=-1)
        dz = (grad_final_key_sum.to(Q.dtype) if grad_final_key_sum is not None
              else S0.new_zeros(S0.shape[:-1]))
        dS_final = torch.cat([dS_final, dz[..., None]], dim=-1)
    else:
        dout = scale * do
    dQ, dK, dV, dS0 = torch.zeros_like(Q), torch.zeros_like(K), torch.zeros_like(V), torch.empty_like(S0)
    for n, b, tokens in sequences:
        starts = _core_forward(Q[b, tokens], K[b, tokens], V[b, tokens], S0[n])[2]
        dQ[b, tokens], dK[b, tokens], dV[b, tokens], dS0[n] = _core_backward(
            dout[b, tokens], dS_final[n], Q[b, tokens], K[b, tokens], V[b, tokens], starts)
    need_q, need_k, need_v, need_state, need_key_sum = needs
    dq = (dQ * phi_grad(q.to(Q.dtype), feature_map)).to(q.dtype) if need_q else None
    dk = (dK * phi_grad(k.to(K.dtype), feature_map)).to(k.dtype) if need_k else None
    dv = dV[..., :v.shape[-1]].to(v.dtype) if need_v else None
    d_state = dS0[..., :v.shape[-1]].clone() if need_state else None
    d_key_sum = dS0[..., -1].clone() if (need_key_sum and normalize) else None
    return dq, dk, dv, d_state, d_key_sum
