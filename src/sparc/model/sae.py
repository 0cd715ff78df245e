"""Multi-stream sparse autoencoder: SPARC (Global TopK + cross-reconstruction), Local TopK, USAE.

Model (method.md sections 1-3). For every stream ``s`` with input dimension ``d_s``:

- input normalisation ``x^s <- x^s / ||x^s||`` (per sample);
- logits ``h^s = W_enc^s (x^s - b_pre^s) + b_lat^s`` (``[B, L]``);
- a code ``z^s`` keeping ``k`` latents (Global TopK: one index set from ``sum_s h^s``; Local TopK:
  each stream its own), ReLU *after* the gather, so a stream can keep fewer than ``k``
  non-zeros;
- decoding ``x^(s->t) = W_dec^t z^s + b_pre^t`` (self when ``s = t``, cross otherwise).

Storage layout. Parameters live in four ``ParameterDict`` keyed by stream name (state-dict keys
``b_pre.<s>``, ``W_enc.<s>``, ``b_lat.<s>``, ``W_dec.<s>``):

- ``b_pre[s]``: ``[d_s]``; ``b_lat[s]``: ``[L]``;
- ``W_enc[s]``: ``[L, d_s]`` (as ``nn.Linear``: row ``l`` is latent ``l``'s encoder direction);
- ``W_dec[s]``: ``[L, d_s]``, i.e. the method's ``W_dec^s`` (``d_s x L``) *transposed*: row ``l``
  is latent ``l``'s unit-norm decoder direction ("column" in the method's notation). The ``k``
  directions of a sample are thus ``k`` contiguous rows, gathered without strided access.

Initialisation (deterministic from ``seed``, independent of the device): ``W_enc^s`` uniform in
``[-1/sqrt(d_s), 1/sqrt(d_s)]`` (the ``nn.Linear`` default), ``W_dec^s = W_enc^s`` with unit rows,
biases zero.

Training speed. :meth:`loss` and :meth:`usae_loss` compute the dense logits once without a graph
(the only ``O(B L d)`` work; oneDNN on CPU, see :mod:`sparc.model.matmul`), choose the indices,
and make the gathered logits differentiable with a sparse backward
(:func:`sparc.model.sparse.gather_logits`). All decodes are sparse
(:func:`sparc.model.sparse.sparse_decode`): only the ``k`` (and ``k_aux``) active decoder rows are
read and receive gradient; each target decoder is decoded by all source streams (and its AuxK
code) in one call, whose backward reads each touched decoder row once. On accelerators no step
synchronises with the host (no ``.item()``, no branching on tensor values); on CPU the AuxK
selection looks at the dead mask on the host (see :func:`sparc.model.topk.aux_topk`).
:meth:`encode`, :meth:`logits` and :meth:`decode` use ordinary differentiable ops (for inference,
and for gradients with respect to the inputs, e.g. localisation).

Gradients of the ``[L, d]`` matrices are dense tensors (as Adam needs) that are zero outside the
touched rows. On CPU, gradients of 8 MiB or more live in reusable buffers
(:class:`sparc.model.sparse.CpuBufferPool`); with ``optimizer.zero_grad(set_to_none=True)`` (the
default) the same buffers serve every step. Gradients are correct either way.

Precision options (attributes, also constructor keywords; not saved with the weights):
``bf16=True`` computes the dense encoder matmul with bfloat16 inputs and float32 output (about 2x
faster than the float32 oneDNN matmul on CPUs with AVX512-BF16, and faster on CUDA; the
gradients and all sparse work stay float32);
``tf32=True`` lets that matmul use TF32 on CUDA (no effect elsewhere). Both only change the logits
within bf16/TF32 rounding.

Gradients and the USAE update rule. In :meth:`usae_loss` with source ``s``, gradients reach
``W_enc[s], b_lat[s], b_pre[s]`` (encoder), ``W_dec[t]`` (the active rows) and ``b_pre[t]`` of
every target ``t``. The "source only" rule of the USAE reference steps only
:meth:`stream_parameters` of ``s``; the "joint" rule steps every parameter with a gradient.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparc.model.losses import LossOutput, nmse, nmse_sources
from sparc.model.matmul import linear
from sparc.model.sparse import decode_rows, gather_logits, row_dots, sparse_decode
from sparc.model.topk import aux_topk, global_topk, local_topk

__all__ = ["Code", "LossOutput", "MultiStreamSAE", "SAEConfig", "normalise_rows"]

TOPK_MODES = ("global", "local")
# Input rows are divided by max(||x||, INPUT_EPS).
INPUT_EPS = 1e-8


class Code(NamedTuple):
    """Sparse code of one stream: ``indices [B, k]`` int64 latent ids, ``values [B, k]`` float >= 0."""

    indices: Tensor
    values: Tensor


@dataclass(frozen=True)
class SAEConfig:
    """Architecture of a :class:`MultiStreamSAE` (everything ``config.json`` stores).

    ``dims``: stream name -> input dimension, in stream order. ``L``: latents per stream (shared
    index space). ``k``: active latents per sample. ``topk``: "global" (SPARC) or "local".
    ``k_aux``: latents used by the AuxK loss (at most ``L`` are used).
    """

    dims: dict[str, int]
    L: int
    k: int
    topk: Literal["global", "local"] = "global"
    k_aux: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.dims, Mapping) or len(self.dims) == 0:
            raise ValueError("SAEConfig.dims: needs at least one stream (name -> input dim)")
        reserved = set(dir(nn.ParameterDict()))
        for name, d in self.dims.items():
            if not isinstance(name, str) or not name or "." in name or name in reserved:
                raise ValueError(
                    f"SAEConfig.dims: stream name {name!r} is not usable as a parameter key "
                    "(non-empty, no '.', not a ParameterDict attribute)"
                )
            if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
                raise ValueError(f"SAEConfig.dims[{name!r}]: input dim must be a positive int, got {d!r}")
        if isinstance(self.L, bool) or not isinstance(self.L, int) or self.L <= 0:
            raise ValueError(f"SAEConfig.L: must be a positive int, got {self.L!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= self.L:
            raise ValueError(f"SAEConfig.k: must be an int in [1, L={self.L}], got {self.k!r}")
        if isinstance(self.k_aux, bool) or not isinstance(self.k_aux, int) or self.k_aux < 1:
            raise ValueError(f"SAEConfig.k_aux: must be a positive int, got {self.k_aux!r}")
        if self.topk not in TOPK_MODES:
            raise ValueError(f"SAEConfig.topk: must be one of {TOPK_MODES}, got {self.topk!r}")
        object.__setattr__(self, "dims", dict(self.dims))

    def to_dict(self) -> dict:
        """JSON-ready mapping (the keys of the constructor)."""
        return {"dims": dict(self.dims), "L": self.L, "k": self.k, "topk": self.topk, "k_aux": self.k_aux}

    @classmethod
    def from_dict(cls, data: Mapping) -> SAEConfig:
        """Inverse of :meth:`to_dict`; unknown or missing keys raise ``ValueError``."""
        keys = {"dims", "L", "k", "topk", "k_aux"}
        unknown = set(data) - keys
        missing = {"dims", "L", "k"} - set(data)
        if unknown or missing:
            raise ValueError(f"SAEConfig: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
        return cls(**{k: data[k] for k in keys if k in data})


def normalise_rows(x: Tensor) -> Tensor:
    """Per-sample L2 normalisation ``x_b / max(||x_b||, eps)`` of ``[B, d]``."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(INPUT_EPS)


@contextmanager
def _tf32_matmul(enabled: bool) -> Iterator[None]:
    """Allow TF32 for CUDA float32 matmuls inside the block, restoring the previous setting."""
    if not enabled:
        yield
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        previous = matmul.fp32_precision
        matmul.fp32_precision = "tf32"
        try:
            yield
        finally:
            matmul.fp32_precision = previous
    else:  # older torch
        previous = matmul.allow_tf32
        matmul.allow_tf32 = True
        try:
            yield
        finally:
            matmul.allow_tf32 = previous


class MultiStreamSAE(nn.Module):
    """SPARC multi-stream TopK SAE; see the module docstring for the maths and storage layout."""

    def __init__(self, cfg: SAEConfig, seed: int = 0, *, bf16: bool = False, tf32: bool = False) -> None:
        super().__init__()
        if not isinstance(cfg, SAEConfig):
            raise TypeError(f"MultiStreamSAE: cfg must be an SAEConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.streams: list[str] = list(cfg.dims)
        self.bf16 = bf16
        self.tf32 = tf32
        gen = torch.Generator().manual_seed(int(seed))
        self.b_pre = nn.ParameterDict()
        self.W_enc = nn.ParameterDict()
        self.b_lat = nn.ParameterDict()
        self.W_dec = nn.ParameterDict()
        for s, d in cfg.dims.items():
            bound = 1.0 / math.sqrt(d)
            w = torch.empty(cfg.L, d).uniform_(-bound, bound, generator=gen)
            self.b_pre[s] = nn.Parameter(torch.zeros(d))
            self.W_enc[s] = nn.Parameter(w)
            self.b_lat[s] = nn.Parameter(torch.zeros(cfg.L))
            self.W_dec[s] = nn.Parameter(w / torch.linalg.vector_norm(w, dim=1, keepdim=True))

    # ------------------------------------------------------------------ helpers

    def stream_parameters(self, stream: str) -> list[nn.Parameter]:
        """``[b_pre, W_enc, b_lat, W_dec]`` of one stream (e.g. for the USAE source-only rule)."""
        self._check_stream(stream)
        return [self.b_pre[stream], self.W_enc[stream], self.b_lat[stream], self.W_dec[stream]]

    def _check_stream(self, stream: str) -> None:
        if stream not in self.cfg.dims:
            raise KeyError(f"unknown stream {stream!r}; this SAE has streams {self.streams}")

    def _check_inputs(self, x: Mapping[str, Tensor], require_all: bool) -> list[str]:
        """Validate a stream -> ``[B, d_s]`` mapping; return its streams in model order."""
        if not isinstance(x, Mapping) or len(x) == 0:
            raise ValueError("expected a non-empty dict stream -> [B, d_s] tensor")
        unknown = [s for s in x if s not in self.cfg.dims]
        if unknown:
            raise KeyError(f"unknown streams {unknown}; this SAE has streams {self.streams}")
        if require_all and len(x) != len(self.streams):
            missing = [s for s in self.streams if s not in x]
            raise ValueError(f"this loss needs every stream; missing {missing}")
        batch = None
        for s, t in x.items():
            if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[1] != self.cfg.dims[s]:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"stream {s!r}: expected [B, {self.cfg.dims[s]}], got {shape}")
            if not t.is_floating_point():
                raise ValueError(f"stream {s!r}: expected a floating tensor, got {t.dtype}")
            if batch is None:
                batch = t.shape[0]
            elif t.shape[0] != batch:
                raise ValueError(f"stream {s!r}: batch size {t.shape[0]} differs from {batch}")
        return [s for s in self.streams if s in x]

    def _check_dead(self, dead: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        if dead is None:
            return {}
        out = {}
        for s, m in dead.items():
            self._check_stream(s)
            if not isinstance(m, Tensor) or m.dtype != torch.bool or tuple(m.shape) != (self.cfg.L,):
                desc = f"{m.dtype} {tuple(m.shape)}" if isinstance(m, Tensor) else type(m).__name__
                raise ValueError(f"dead[{s!r}]: expected a bool tensor of shape [{self.cfg.L}], got {desc}")
            out[s] = m.to(self.W_enc[s].device)
        return out

    def _prepare(self, s: str, x: Tensor) -> Tensor:
        W = self.W_enc[s]
        return normalise_rows(x.to(device=W.device, dtype=W.dtype))

    def _logits(self, s: str, xn: Tensor) -> Tensor:
        """``(xn - b_pre) W_enc^T + b_lat`` with the precision options (graph if grad is enabled)."""
        xc = xn - self.b_pre[s]
        W = self.W_enc[s]
        if self.bf16:
            return F.linear(xc.to(torch.bfloat16), W.to(torch.bfloat16)).to(W.dtype) + self.b_lat[s]
        with _tf32_matmul(self.tf32 and W.device.type == "cuda"):
            return linear(xc, W, self.b_lat[s])

    def _select(self, h: dict[str, Tensor], mode: str) -> dict[str, Tensor]:
        if mode == "global":
            idx = global_topk(list(h.values()), self.cfg.k)
            return {s: idx for s in h}
        if mode == "local":
            return {s: local_topk(v, self.cfg.k) for s, v in h.items()}
        raise ValueError(f"topk mode must be one of {TOPK_MODES}, got {mode!r}")

    # ------------------------------------------------------------------ inference API

    def logits(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        """L2-normalise each row and return the raw logits ``h^s [B, L]`` of the given streams."""
        streams = self._check_inputs(x, require_all=False)
        return {s: self._logits(s, self._prepare(s, x[s])) for s in streams}

    def encode(self, x: dict[str, Tensor], mode: str | None = None) -> dict[str, Code]:
        """Sparse codes of the given (non-empty) subset of streams.

        ``mode`` None -> ``cfg.topk``; "global": one index set from the summed logits of the
        streams given (joint inference); "local": each stream its own top-k (per-stream
        inference, used for retrieval). Values are ``ReLU(h^s)`` at the indices (may hold zeros).
        Differentiable with ordinary autograd (inputs included).
        """
        h = self.logits(x)
        idx = self._select(h, self.cfg.topk if mode is None else mode)
        return {s: Code(idx[s], F.relu(h[s].gather(1, idx[s]))) for s in h}

    def decode(self, code: Code, stream: str) -> Tensor:
        """``W_dec^s z + b_pre^s`` from a sparse code (``[B, k]`` ids and values): ``[B, d_s]``."""
        self._check_stream(stream)
        indices, values = code
        if indices.shape != values.shape or indices.dim() != 2:
            raise ValueError(f"decode: indices {tuple(indices.shape)} and values {tuple(values.shape)} must be equal [B, k]")
        W = self.W_dec[stream]
        (out,) = sparse_decode(W, [(values.to(W.dtype).unsqueeze(1), indices.long())])
        return out[:, 0] + self.b_pre[stream]

    # ------------------------------------------------------------------ training

    def _encode_train(
        self, xn: dict[str, Tensor], mode: str, dead: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
        """Training-path encode: ``(idx, z, aux)`` with ``aux[s] = (aux_idx, aux_values)``.

        Logits are computed once without a graph; gathered logits get the sparse backward.
        """
        k = self.cfg.k
        with torch.no_grad():
            h = {s: self._logits(s, v) for s, v in xn.items()}
            idx = self._select(h, mode)
            aux_sel = {s: aux_topk(h[s], dead[s], self.cfg.k_aux) for s in h if s in dead}
        z, aux = {}, {}
        for s in h:
            cols = idx[s] if s not in aux_sel else torch.cat([idx[s], aux_sel[s][0]], dim=1)
            pre = gather_logits(h[s], xn[s], self.b_pre[s], self.W_enc[s], self.b_lat[s], cols, split=k)
            z[s] = F.relu(pre[:, :k])
            if s in aux_sel:
                aux_idx, valid = aux_sel[s]
                aux[s] = (aux_idx, F.relu(pre[:, k:]) * valid)
        return idx, z, aux

    def _aux_term(self, s: str, e: Tensor, xn: Tensor, xhat_self: Tensor, dead: Tensor) -> Tensor:
        """AuxK term of one stream: NMSE of ``e`` against the detached residual; 0 if none dead."""
        residual = (xn - xhat_self).detach()
        return nmse(e, residual) * dead.any().to(e.dtype)

    @staticmethod
    def _stats(z: Tensor, idx: Tensor, L: int) -> tuple[Tensor, Tensor]:
        """``(l0, fired)``: mean non-zeros per sample and bool ``[L]`` of latents that fired."""
        active = z > 0
        l0 = active.sum(1).to(z.dtype).mean().detach()
        hits = torch.zeros(L, dtype=z.dtype, device=z.device)
        hits.index_add_(0, idx.reshape(-1), active.reshape(-1).to(z.dtype))
        return l0, hits > 0

    def loss(self, x: dict[str, Tensor], lam: float, dead: dict[str, Tensor] | None = None,
             aux_coef: float = 1 / 32) -> LossOutput:
        """SPARC loss (method.md section 2) with the configured TopK rule.

        ``total = L_self + aux_coef * L_aux + lam * L_cross`` where ``L_self`` is the mean over
        streams of ``NMSE(x^(s->s), x^s)``, ``L_cross`` the mean over ordered pairs ``s != t`` of
        ``NMSE(x^(s->t), x^t)`` and ``L_aux`` the mean over streams of the AuxK term (top
        ``k_aux`` logits among ``dead[s]``, ReLU, decoded with ``W_dec^s`` without ``b_pre``,
        NMSE against ``x^s - stopgrad(x^(s->s))``; 0 for a stream with no dead latent or absent
        from ``dead``). Targets are the L2-normalised inputs. With ``lam == 0`` the cross terms
        are only measured (no graph), so they send no gradient anywhere.
        """
        streams = self._check_inputs(x, require_all=True)
        dead_m = self._check_dead(dead)
        lam = float(lam)
        xn = {s: self._prepare(s, x[s]) for s in streams}
        mode = self.cfg.topk
        idx, z, aux = self._encode_train(xn, mode, dead_m)
        n = len(streams)
        cols, aux_terms = [], []
        for t in streams:
            # decode every source's code into t (sources in stream order), plus t's AuxK code
            trained = streams if lam != 0.0 else [t]
            if mode == "global":
                groups = [(torch.stack([z[s] for s in trained], dim=1), idx[t])]
            else:
                groups = [(z[s].unsqueeze(1), idx[s]) for s in trained]
            if t in aux:
                groups.append((aux[t][1].unsqueeze(1), aux[t][0]))
            outs = sparse_decode(self.W_dec[t], groups)
            e_aux = outs.pop()[:, 0] if t in aux else None
            rec = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
            if lam == 0.0 and n > 1:  # cross reconstructions only measured, without a graph
                with torch.no_grad():
                    others = [decode_rows(z[s].unsqueeze(1), idx[s], self.W_dec[t]) for s in streams if s != t]
                i = streams.index(t)
                rec = torch.cat(others[:i] + [rec] + others[i:], dim=1)
            rec = rec + self.b_pre[t]  # [B, n, d_t]: x^(s->t) for every source s
            cols.append(nmse_sources(rec, xn[t]))
            if e_aux is not None:
                xhat_self = rec[:, streams.index(t)]
                aux_terms.append(self._aux_term(t, e_aux, xn[t], xhat_self, dead_m[t]))
        M = torch.stack(cols, dim=1)  # [source, target] NMSE
        diag = torch.diagonal(M)
        l_self = diag.mean()
        l_cross = (M.sum() - diag.sum()) / (n * (n - 1)) if n > 1 else M.new_zeros(())
        l_aux = torch.stack(aux_terms).sum() / n if aux_terms else M.new_zeros(())
        total = l_self + aux_coef * l_aux
        if lam != 0.0:
            total = total + lam * l_cross

        Md = M.detach()
        terms: dict[str, Tensor] = {}
        fired: dict[str, Tensor] = {}
        for i, s in enumerate(streams):
            terms[f"self_nmse/{s}"] = Md[i, i]
            for j, t in enumerate(streams):
                if t != s:
                    terms[f"cross_nmse/{s}->{t}"] = Md[i, j]
            terms[f"l0/{s}"], fired[s] = self._stats(z[s], idx[s], self.cfg.L)
        for s, a in zip([s for s in streams if s in aux], aux_terms, strict=True):
            terms[f"aux/{s}"] = a.detach()
        terms.update(self_nmse=l_self.detach(), cross_nmse=l_cross.detach(), aux=l_aux.detach())
        return LossOutput(total=total, terms=terms, fired=fired)

    def usae_loss(self, x: dict[str, Tensor], source: str, dead: dict[str, Tensor] | None = None,
                  aux_coef: float = 1 / 32) -> LossOutput:
        """USAE step (method.md section 3): encode ``source`` alone, decode into every stream.

        ``z = ReLU(h^source)`` at its own top-k; ``total = mean_t NMSE(x^(source->t), x^t) +
        aux_coef * aux_source`` over all streams ``t`` (self included). Terms as in :meth:`loss`
        for the source's row (``self_nmse``, ``cross_nmse`` = mean over ``t != source``) plus
        ``usae_nmse`` (the mean over all targets); ``fired`` holds the source stream only.
        """
        streams = self._check_inputs(x, require_all=True)
        self._check_stream(source)
        dead_m = {s: m for s, m in self._check_dead(dead).items() if s == source}
        xn = {s: self._prepare(s, x[s]) for s in streams}
        idx, z, aux = self._encode_train({source: xn[source]}, "local", dead_m)
        code, ids = z[source].unsqueeze(1), idx[source]
        terms: dict[str, Tensor] = {}
        per_target, cross_terms = [], []
        aux_term = xn[source].new_zeros(())
        for t in streams:
            groups = [(code, ids)]
            if t == source and source in aux:
                groups.append((aux[source][1].unsqueeze(1), aux[source][0]))
            outs = sparse_decode(self.W_dec[t], groups)
            xhat = outs[0][:, 0] + self.b_pre[t]
            e = nmse(xhat, xn[t])
            per_target.append(e)
            if t == source:
                terms[f"self_nmse/{t}"] = e.detach()
                terms["self_nmse"] = e.detach()
                if len(outs) > 1:
                    aux_term = self._aux_term(t, outs[1][:, 0], xn[t], xhat, dead_m[t])
                    terms[f"aux/{t}"] = aux_term.detach()
            else:
                cross_terms.append(e)
                terms[f"cross_nmse/{source}->{t}"] = e.detach()
        l_usae = torch.stack(per_target).mean()
        terms["cross_nmse"] = (torch.stack(cross_terms).mean() if cross_terms else aux_term.new_zeros(())).detach()
        terms["aux"] = aux_term.detach()
        terms["usae_nmse"] = l_usae.detach()
        l0, fired = self._stats(z[source], ids, self.cfg.L)
        terms[f"l0/{source}"] = l0
        return LossOutput(total=l_usae + aux_coef * aux_term, terms=terms, fired={source: fired})

    # ------------------------------------------------------------------ maintenance

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Rescale every decoder direction (row of ``W_dec[s]``) to unit L2 norm, in place."""
        for W in self.W_dec.values():
            W.div_(torch.linalg.vector_norm(W, dim=1, keepdim=True).clamp_min(INPUT_EPS))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project each decoder row's gradient onto the row's orthogonal complement, in place.

        ``g_l <- g_l - (<g_l, w_l> / ||w_l||^2) w_l`` (``= g_l - <g_l, w_l> w_l`` for the unit rows
        kept by :meth:`normalise_decoder`); decoders without a gradient are skipped.
        """
        for W in self.W_dec.values():
            g = W.grad
            if g is None:
                continue
            sq = torch.linalg.vector_norm(W, dim=1).square().clamp_min(INPUT_EPS)
            g.addcmul_(W, (row_dots(g, W) / sq).unsqueeze(1), value=-1.0)

    @torch.no_grad()
    def revive(self, stream: str, latents: Tensor, generator: torch.Generator,
               scale: float = 0.01) -> list[tuple[nn.Parameter, Tensor]]:
        """Re-initialise dead latents of one stream: encoder rows <- small noise, latent bias <- 0.

        ``latents``: bool ``[L]`` mask or int64 ids. The new rows are ``N(0, scale^2 / d_s)`` per
        entry (norm about ``scale``), drawn from ``generator`` (on its own device). The decoder is
        left as is. Returns ``[(W_enc[stream], rows), (b_lat[stream], rows)]`` with ``rows`` the
        int64 ids, so the trainer can reset the optimiser state of exactly those rows.
        """
        self._check_stream(stream)
        W, b = self.W_enc[stream], self.b_lat[stream]
        if latents.dtype == torch.bool:
            if tuple(latents.shape) != (self.cfg.L,):
                raise ValueError(f"revive: bool mask must have shape [{self.cfg.L}], got {tuple(latents.shape)}")
            rows = latents.to(W.device).nonzero().view(-1)
        elif not latents.is_floating_point() and latents.dim() == 1:
            rows = latents.to(device=W.device, dtype=torch.long)
            if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.cfg.L):
                raise ValueError(f"revive: latent ids must lie in [0, {self.cfg.L})")
        else:
            raise ValueError(f"revive: latents must be a bool [L] mask or 1-D int ids, got {latents.dtype} {tuple(latents.shape)}")
        d = W.shape[1]
        noise = torch.randn(rows.numel(), d, generator=generator, device=generator.device,
                            dtype=W.dtype) * (scale / math.sqrt(d))
        W[rows] = noise.to(W.device)
        b[rows] = 0.0
        return [(W, rows), (b, rows)]
