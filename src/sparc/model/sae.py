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
default) the same buffers serve every step. Gradients are correct either way. On a CPU the
trainer does not call :meth:`loss` for SPARC runs at all: :mod:`sparc.train.fused` computes the
same step (loss, gradients, projection, Adam, renormalisation) in compiled passes, about twice
as fast; this autograd path is the reference it is tested against, and runs everywhere else.

Precision options (attributes, also constructor keywords; not saved with the weights):
``bf16=True`` computes the dense encoder matmul with bfloat16 inputs and float32 output (about 2x
faster than the float32 oneDNN matmul on CPUs with AVX512-BF16, and faster on CUDA; the
gradients and all sparse work stay float32);
``tf32=True`` lets that matmul use TF32 on CUDA (no effect elsewhere). Both only change the logits
within bf16/TF32 rounding.

Gradients and the USAE update rule. In :meth:`usae_loss` with source ``s``, gradients reach
``W_enc[s], b_lat[s], b_pre[s]`` (encoder), ``W_dec[t]`` (the active rows) and ``b_pre[t]`` of
every target ``t`` (with ``lam == 0`` only ``W_dec[s]`` and ``b_pre[s]``); in
:meth:`usae_paper_loss` they reach ``W_enc[s], b_lat[s], bn[s]`` and ``W_dec[t]``. The "source
only" rule of the USAE reference steps only :meth:`stream_parameters` of ``s``; the "joint" rule
steps every parameter with a gradient.

The USAE paper's SAE (``SAEConfig.encoder == "batchnorm"``, method.md section 3, trained by
:meth:`usae_paper_loss`; the reference is the USAE authors' code on the overcomplete library):

- encoder ``h^s = BN^s(W_enc^s x^s + b_lat^s)``, an affine per-latent batch normalisation
  (:class:`LatentBatchNorm`: ``nn.BatchNorm1d``'s maths, momentum 0.1, eps 1e-5, as the
  reference's ``mlp_bn_1`` encoder), then ReLU and each stream's own top-k (USAE is always Local
  TopK). ``b_lat`` is the reference's ``nn.Linear`` bias; BN removes it under batch statistics;
- bias-free dictionary ``x^(s->t) = W_dec^t z^s``: no ``b_pre`` (state-dict keys ``W_enc.<s>``,
  ``b_lat.<s>``, ``W_dec.<s>``, ``bn.<s>.weight``, ``bn.<s>.bias``, ``bn.<s>.running_mean``,
  ``bn.<s>.running_var``). Rows of ``W_dec`` are kept unit-norm as for every model here (projected
  gradient, then renormalisation); the reference re-normalises a free matrix inside every forward
  pass, whose gradient at a unit row is the same projected gradient;
- input scale: rows are L2-normalised as for every model of this project, then scaled to norm
  ``sqrt(d_s)`` so that entries have an RMS of 1 like the reference's standardised activations,
  the scale BN's initial weight 1 and the L1 error are meant for (at norm 1 the unit-variance codes
  decoded by unit rows are several times longer than the inputs: on the tests' planted data
  training starts at NMSE about 10 and stays above 1 for hundreds of steps). The model thus
  reconstructs ``sqrt(d_t) x^t``; :meth:`decode` divides by ``sqrt(d_t)`` and returns
  reconstructions in the unit-norm space of every other model. The reference also centres each
  dimension with dataset statistics; not done here (every method sees the same L2-normalised
  data), so latents of the bias-free dictionary carry the data's mean direction;
- statistics: the training loss uses the batch's (and updates the running ones) when the module is
  in training mode, the running ones in eval mode; :meth:`logits` and :meth:`encode` (inference)
  always use the running statistics and never change them;
- initialisation: the same ``W_enc``/``W_dec`` as the linear encoder (the reference draws an
  independent Gaussian dictionary); BN weight 1, bias 0, running mean 0, running variance 1.

Longer than 500 lines because it is one ``nn.Module`` whose methods (encode, decode, the three
losses, revival) share its parameters and shapes; what stands alone is already beside it
(topk.py, sparse.py, losses.py, io.py).
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

from sparc.model.losses import NMSE_EPS, LossOutput, nmse, nmse_sources, sparc_objective
from sparc.model.matmul import linear
from sparc.model.sparse import (
    decode_rows,
    gather_logits,
    normalise_rows_,
    remove_parallel_,
    sparse_decode,
)
from sparc.model.topk import aux_topk, global_topk, local_topk, subset_topk

__all__ = ["Code", "LatentBatchNorm", "LossOutput", "MultiStreamSAE", "SAEConfig", "normalise_rows"]

TOPK_MODES = ("global", "local")
# Encoder kinds: "linear" (SPARC, today's USAE), "batchnorm" (the USAE paper's SAE, no pre-bias).
ENCODERS = ("linear", "batchnorm")
# Input rows are divided by max(||x||, INPUT_EPS).
INPUT_EPS = 1e-8
# Batch normalisation of the "batchnorm" encoder: nn.BatchNorm1d's defaults, as in the USAE reference.
BN_MOMENTUM = 0.1
BN_EPS = 1e-5
# usae_paper_loss: weight of the auxiliary term (the reference's penalty=0.1).
USAE_PAPER_AUX_COEF = 0.1
# A latent fires in a batch when one of its activations exceeds this (dead-latent counters only;
# l0 counts every non-zero). The SPARC reference uses 1e-3; see docs/differences.md.
FIRE_THRESHOLD = 0.0
# Denominator of the AuxK NMSE: "residual" ||x - xhat||^2 (this project) or "reference"
# ||x - W_dec z||^2 = ||residual + b_pre||^2 (the SPARC and OpenAI reference code).
AUX_DENOMINATOR: Literal["residual", "reference"] = "residual"


class Code(NamedTuple):
    """Sparse code of one stream: ``indices [B, k]`` int64 latent ids, ``values [B, k]`` float >= 0."""

    indices: Tensor
    values: Tensor


@dataclass(frozen=True)
class SAEConfig:
    """Architecture of a :class:`MultiStreamSAE` (everything ``config.json`` stores).

    ``dims``: stream name -> input dimension, in stream order. ``L``: latents per stream (shared
    index space). ``k``: active latents per sample. ``topk``: "global" (SPARC) or "local".
    ``k_aux``: latents used by the AuxK loss (at most ``L`` are used). ``encoder``: "linear"
    (``W_enc (x - b_pre) + b_lat``, decoder with ``b_pre``) or "batchnorm" (the USAE paper's
    ``BN(W_enc x + b_lat)``, bias-free decoder; see the module docstring). A ``config.json``
    without ``encoder`` (written before the key existed) is a "linear" model.
    """

    dims: dict[str, int]
    L: int
    k: int
    topk: Literal["global", "local"] = "global"
    k_aux: int = 64
    encoder: Literal["linear", "batchnorm"] = "linear"

    def __post_init__(self) -> None:
        if not isinstance(self.dims, Mapping) or len(self.dims) == 0:
            raise ValueError("SAEConfig.dims: needs at least one stream (name -> input dim)")
        reserved = set(dir(nn.ParameterDict())) | set(dir(nn.ModuleDict()))
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
        if self.encoder not in ENCODERS:
            raise ValueError(f"SAEConfig.encoder: must be one of {ENCODERS}, got {self.encoder!r}")
        object.__setattr__(self, "dims", dict(self.dims))

    def to_dict(self) -> dict:
        """JSON-ready mapping (the keys of the constructor)."""
        return {"dims": dict(self.dims), "L": self.L, "k": self.k, "topk": self.topk, "k_aux": self.k_aux,
                "encoder": self.encoder}

    @classmethod
    def from_dict(cls, data: Mapping) -> SAEConfig:
        """Inverse of :meth:`to_dict`; unknown or missing keys raise ``ValueError`` (``topk``,
        ``k_aux`` and ``encoder`` may be missing: their defaults apply)."""
        keys = {"dims", "L", "k", "topk", "k_aux", "encoder"}
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


class LatentBatchNorm(nn.Module):
    """Affine batch normalisation of logits ``[B, L]``, per latent (``nn.BatchNorm1d``'s maths).

    ``out = weight * (h - mean) / sqrt(var + BN_EPS) + bias``. With batch statistics, ``mean`` and
    ``var`` (biased) are the batch's and the buffers move towards them:
    ``running <- (1 - BN_MOMENTUM) running + BN_MOMENTUM * batch`` (unbiased variance there); with
    running statistics the buffers ``running_mean``/``running_var`` are used and left unchanged.
    Unlike ``nn.BatchNorm1d`` the caller, not the module's mode, chooses the statistics.
    """

    def __init__(self, L: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(L))
        self.bias = nn.Parameter(torch.zeros(L))
        self.register_buffer("running_mean", torch.zeros(L))
        self.register_buffer("running_var", torch.ones(L))

    def forward(self, h: Tensor, batch_stats: bool) -> Tensor:
        if batch_stats and h.shape[0] < 2:
            raise ValueError(f"batch normalisation with batch statistics needs at least 2 samples, got {h.shape[0]}")
        return F.batch_norm(h, self.running_mean, self.running_var, self.weight, self.bias,
                            training=batch_stats, momentum=BN_MOMENTUM, eps=BN_EPS)

    @torch.no_grad()
    def reset_rows(self, rows: Tensor) -> None:
        """Latents ``rows`` back to their initial state (weight 1, bias 0, running mean 0, variance 1)."""
        self.weight[rows] = 1.0
        self.bias[rows] = 0.0
        self.running_mean[rows] = 0.0
        self.running_var[rows] = 1.0


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
        self.batchnorm = cfg.encoder == "batchnorm"
        self.b_pre = nn.ParameterDict()  # empty for the "batchnorm" encoder (bias-free dictionary)
        self.W_enc = nn.ParameterDict()
        self.b_lat = nn.ParameterDict()
        self.W_dec = nn.ParameterDict()
        self.bn = nn.ModuleDict()  # "batchnorm" encoder only
        for s, d in cfg.dims.items():
            bound = 1.0 / math.sqrt(d)
            w = torch.empty(cfg.L, d).uniform_(-bound, bound, generator=gen)
            if self.batchnorm:
                self.bn[s] = LatentBatchNorm(cfg.L)
            else:
                self.b_pre[s] = nn.Parameter(torch.zeros(d))
            self.W_enc[s] = nn.Parameter(w)
            self.b_lat[s] = nn.Parameter(torch.zeros(cfg.L))
            self.W_dec[s] = nn.Parameter(w / torch.linalg.vector_norm(w, dim=1, keepdim=True))

    # ------------------------------------------------------------------ helpers

    def stream_parameters(self, stream: str) -> list[nn.Parameter]:
        """The parameters of one stream (e.g. for the USAE source-only rule): ``[b_pre, W_enc,
        b_lat, W_dec]``, or for the "batchnorm" encoder ``[W_enc, b_lat, bn.weight, bn.bias, W_dec]``."""
        self._check_stream(stream)
        if self.batchnorm:
            bn = self.bn[stream]
            return [self.W_enc[stream], self.b_lat[stream], bn.weight, bn.bias, self.W_dec[stream]]
        return [self.b_pre[stream], self.W_enc[stream], self.b_lat[stream], self.W_dec[stream]]

    def _check_encoder(self, batchnorm: bool, method: str) -> None:
        if self.batchnorm != batchnorm:
            raise ValueError(f"{method} needs the {'batchnorm' if batchnorm else 'linear'} encoder, "
                             f"this SAE has encoder={self.cfg.encoder!r}")

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
        """Rows L2-normalised; the batchnorm encoder's then scaled to norm ``sqrt(d_s)``."""
        W = self.W_enc[s]
        xn = normalise_rows(x.to(device=W.device, dtype=W.dtype))
        return xn * math.sqrt(self.cfg.dims[s]) if self.batchnorm else xn

    def _logits(self, s: str, xn: Tensor, batch_stats: bool = False) -> Tensor:
        """Logits ``[B, L]`` with the precision options (graph if grad is enabled).

        Linear encoder: ``(xn - b_pre) W_enc^T + b_lat``. Batchnorm encoder:
        ``BN(xn W_enc^T + b_lat)`` with the batch's statistics if ``batch_stats`` (updating the
        running ones), else with the running statistics.
        """
        xc = xn if self.batchnorm else xn - self.b_pre[s]
        W = self.W_enc[s]
        if self.bf16:
            h = F.linear(xc.to(torch.bfloat16), W.to(torch.bfloat16)).to(W.dtype) + self.b_lat[s]
        else:
            with _tf32_matmul(self.tf32 and W.device.type == "cuda"):
                h = linear(xc, W, self.b_lat[s])
        return self.bn[s](h, batch_stats) if self.batchnorm else h

    def _select(self, h: dict[str, Tensor], mode: str) -> dict[str, Tensor]:
        if mode == "global":
            idx = global_topk(list(h.values()), self.cfg.k)
            return {s: idx for s in h}
        if mode == "local":
            return {s: local_topk(v, self.cfg.k) for s, v in h.items()}
        raise ValueError(f"topk mode must be one of {TOPK_MODES}, got {mode!r}")

    # ------------------------------------------------------------------ inference API

    def logits(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        """L2-normalise each row and return the raw logits ``h^s [B, L]`` of the given streams
        (batchnorm encoder: with the running statistics, in either module mode)."""
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
        """``W_dec^s z + b_pre^s`` (batchnorm encoder: ``W_dec^s z / sqrt(d_s)``, see the module
        docstring) from a sparse code (``[B, k]`` ids and values): ``[B, d_s]``."""
        self._check_stream(stream)
        indices, values = code
        if indices.shape != values.shape or indices.dim() != 2:
            raise ValueError(f"decode: indices {tuple(indices.shape)} and values {tuple(values.shape)} must be equal [B, k]")
        W = self.W_dec[stream]
        (out,) = sparse_decode(W, [(values.to(W.dtype).unsqueeze(1), indices.long())])
        if self.batchnorm:
            return out[:, 0] / math.sqrt(self.cfg.dims[stream])
        return out[:, 0] + self.b_pre[stream]

    # ------------------------------------------------------------------ training

    def _encode_train(
        self, xn: dict[str, Tensor], mode: str, dead: dict[str, Tensor],
        keep: Tensor | None = None, consistency: bool = False,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, tuple[Tensor, Tensor]], Tensor | None]:
        """Training-path encode: ``(idx, z, aux, consistency)`` with ``aux[s] = (aux_idx, aux_values)``.

        Logits are computed once without a graph; gathered logits get the sparse backward.
        ``keep [B, n]`` (Global TopK only): the streams whose logits choose each sample's index
        set (:func:`~sparc.model.topk.subset_topk`). ``consistency``: also return the
        :meth:`consistency_term` of the streams' own top-k against that index set (else None).
        """
        k = self.cfg.k
        with torch.no_grad():
            h = {s: self._logits(s, v) for s, v in xn.items()}
            if keep is not None and mode == "global":
                shared = subset_topk(list(h.values()), keep, k)
                idx = {s: shared for s in h}
            else:
                idx = self._select(h, mode)
            aux_sel = {s: aux_topk(h[s], dead[s], self.cfg.k_aux) for s in h if s in dead}
        z, aux, terms = {}, {}, []
        for s in h:
            cols = idx[s] if s not in aux_sel else torch.cat([idx[s], aux_sel[s][0]], dim=1)
            pre = gather_logits(h[s], xn[s], self.b_pre[s], self.W_enc[s], self.b_lat[s], cols, split=k)
            z[s] = F.relu(pre[:, :k])
            if s in aux_sel:
                aux_idx, valid = aux_sel[s]
                aux[s] = (aux_idx, F.relu(pre[:, k:]) * valid)
            if consistency:
                terms.append(self.consistency_term(s, h[s], xn[s], idx[s], pre[:, :k]))
        return idx, z, aux, (torch.stack(terms).mean() if terms else None)

    def consistency_term(self, s: str, h: Tensor, xn: Tensor, idx: Tensor, pre: Tensor) -> Tensor:
        """Hinge between stream ``s``'s own top-k and the shared index set (training only).

        ``h [B, L]``: the stream's logits (no graph); ``idx [B, k]``: the index set the sample
        uses; ``pre [B, k]``: ``h`` at ``idx`` with the sparse backward. With ``T`` the stream's own
        top-k and the detached threshold ``tau_b = (h_(k) + h_(k+1)) / 2`` (midway between its
        k-th and (k+1)-th largest logits), the term is the batch mean of

        ``(sum_{i in idx - T} relu(tau - h_i) + sum_{j in T - idx} relu(h_j - tau)) / k``:

        zero when the stream alone would pick the shared set, and otherwise pushing the shared
        latents up and the stream's intruders down, until its own top-k is the shared one.
        Zero (with a graph) when ``k == L``.
        """
        k, L = self.cfg.k, self.cfg.L
        if k >= L:
            return pre.sum() * 0.0
        with torch.no_grad():
            top = torch.topk(h, k + 1, dim=1)
            own = top.indices[:, :k]
            tau = top.values[:, k - 1 : k + 1].mean(1, keepdim=True)
            own_mask = torch.zeros_like(h, dtype=torch.bool).scatter_(1, own, True)
            shared_mask = torch.zeros_like(h, dtype=torch.bool).scatter_(1, idx, True)
            missing = ~own_mask.gather(1, idx)  # shared latents the stream would not pick
            intruder = ~shared_mask.gather(1, own)  # the stream's picks outside the shared set
        pre_own = gather_logits(h, xn, self.b_pre[s], self.W_enc[s], self.b_lat[s], own)
        up = (F.relu(tau - pre) * missing).sum(1)
        down = (F.relu(pre_own - tau) * intruder).sum(1)
        return ((up + down) / k).mean()

    def _aux_term(self, s: str, e: Tensor, xn: Tensor, xhat_self: Tensor, dead: Tensor) -> Tensor:
        """AuxK term of one stream: NMSE of ``e`` against the detached residual; 0 if none dead.

        The denominator is ``||residual||^2``, or with ``AUX_DENOMINATOR == "reference"``
        ``||residual + b_pre||^2`` (the reference's target ``x - xhat + b_pre``, decoded with ``b_pre``).
        """
        residual = (xn - xhat_self).detach()
        if AUX_DENOMINATOR == "residual":
            return nmse(e, residual) * dead.any().to(e.dtype)
        denominator = (residual + self.b_pre[s].detach()).pow(2).sum(-1).clamp_min(NMSE_EPS)
        return ((e - residual).pow(2).sum(-1) / denominator).mean() * dead.any().to(e.dtype)

    @staticmethod
    def _stats(z: Tensor, idx: Tensor, L: int) -> tuple[Tensor, Tensor]:
        """``(l0, fired)``: mean non-zeros per sample and bool ``[L]`` of latents with an
        activation above ``FIRE_THRESHOLD``."""
        active = z > 0
        l0 = active.sum(1).to(z.dtype).mean().detach()
        firing = active if FIRE_THRESHOLD == 0.0 else z > FIRE_THRESHOLD
        hits = torch.zeros(L, dtype=z.dtype, device=z.device)
        hits.index_add_(0, idx.reshape(-1), firing.reshape(-1).to(z.dtype))
        return l0, hits > 0

    def loss(self, x: dict[str, Tensor], lam: float, dead: dict[str, Tensor] | None = None,
             aux_coef: float = 1 / 32, keep: Tensor | None = None, consistency: float = 0.0) -> LossOutput:
        """SPARC loss (method.md section 2) with the configured TopK rule.

        ``total = L_self + aux_coef * L_aux + lam * L_cross`` where ``L_self`` is the mean over
        streams of ``NMSE(x^(s->s), x^s)``, ``L_cross`` the mean over ordered pairs ``s != t`` of
        ``NMSE(x^(s->t), x^t)`` and ``L_aux`` the mean over streams of the AuxK term (top
        ``k_aux`` logits among ``dead[s]``, ReLU, decoded with ``W_dec^s`` without ``b_pre``,
        NMSE against ``x^s - stopgrad(x^(s->s))``; 0 for a stream with no dead latent or absent
        from ``dead``). Targets are the L2-normalised inputs. With ``lam == 0`` the cross terms
        are only measured (no graph), so they send no gradient anywhere. Linear encoder only.

        Training options of Global TopK (docs/alignment.md):
        ``keep [B, n]`` bool chooses each sample's index set from the summed logits of its kept
        streams only (:func:`~sparc.model.topk.subset_topk`; None = all streams, as above);
        ``consistency > 0`` adds ``consistency * C`` with ``C`` the mean over streams of
        :meth:`consistency_term` (logged as ``consistency``).
        """
        self._check_encoder(False, "loss")
        streams = self._check_inputs(x, require_all=True)
        dead_m = self._check_dead(dead)
        lam = float(lam)
        xn = {s: self._prepare(s, x[s]) for s in streams}
        mode = self.cfg.topk
        if (keep is not None or consistency) and mode != "global":
            raise ValueError("loss: keep and consistency apply to Global TopK only")
        consistency = float(consistency)
        idx, z, aux, c_term = self._encode_train(xn, mode, dead_m, keep, consistency > 0)
        n = len(streams)
        cols: list[Tensor] = []
        aux_terms: dict[str, Tensor] = {}
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
                aux_terms[t] = self._aux_term(t, e_aux, xn[t], xhat_self, dead_m[t])
        M = torch.stack(cols, dim=1)  # [source, target] NMSE
        l0, fired = {}, {}
        for s in streams:
            l0[s], fired[s] = self._stats(z[s], idx[s], self.cfg.L)
        total, terms = sparc_objective(streams, M, aux_terms, lam, aux_coef, l0)
        if c_term is not None:
            total = total + consistency * c_term
            terms["consistency"] = c_term.detach()
        return LossOutput(total=total, terms=terms, fired=fired)

    def usae_loss(self, x: dict[str, Tensor], source: str, dead: dict[str, Tensor] | None = None,
                  aux_coef: float = 1 / 32, lam: float = 1.0) -> LossOutput:
        """USAE step (method.md section 3) of this project's variant: encode ``source`` alone,
        decode into every stream.

        ``z = ReLU(h^source)`` at its own top-k;
        ``total = (NMSE(x^(s->s), x^s) + lam * sum_{t != s} NMSE(x^(s->t), x^t)) / M +
        aux_coef * aux_s`` with ``s = source`` and ``M`` streams. ``lam`` weights the
        cross-decoding terms (the source's code decoded by the other streams' decoders): ``lam = 1``
        is the plain mean over all ``M`` targets (exactly the loss before ``lam`` applied here:
        multiplying by 1.0 is exact, so weights are bit-identical), ``lam = 0`` trains
        self-reconstruction only (the cross terms are then measured without a graph and send no
        gradient, so the other streams' decoders get none). ``aux_s`` is the AuxK term of
        :meth:`loss` for the source. Terms as in :meth:`loss` for the source's row (``self_nmse``,
        ``cross_nmse`` = mean over ``t != source``) plus ``usae_nmse`` (the unweighted mean over
        all targets); ``fired`` holds the source stream only. Linear encoder only.
        """
        self._check_encoder(False, "usae_loss")
        streams = self._check_inputs(x, require_all=True)
        self._check_stream(source)
        lam = float(lam)
        dead_m = {s: m for s, m in self._check_dead(dead).items() if s == source}
        xn = {s: self._prepare(s, x[s]) for s in streams}
        idx, z, aux, _ = self._encode_train({source: xn[source]}, "local", dead_m)
        code, ids = z[source].unsqueeze(1), idx[source]
        terms: dict[str, Tensor] = {}
        per_target, weighted, cross_terms = [], [], []
        aux_term = xn[source].new_zeros(())
        for t in streams:
            groups = [(code, ids)]
            if t == source and source in aux:
                groups.append((aux[source][1].unsqueeze(1), aux[source][0]))
            with torch.set_grad_enabled(torch.is_grad_enabled() and (t == source or lam != 0.0)):
                outs = sparse_decode(self.W_dec[t], groups)
                xhat = outs[0][:, 0] + self.b_pre[t]
                e = nmse(xhat, xn[t])
            per_target.append(e)
            weighted.append(e if t == source else lam * e)
            if t == source:
                terms[f"self_nmse/{t}"] = e.detach()
                terms["self_nmse"] = e.detach()
                if len(outs) > 1:
                    aux_term = self._aux_term(t, outs[1][:, 0], xn[t], xhat, dead_m[t])
                    terms[f"aux/{t}"] = aux_term.detach()
            else:
                cross_terms.append(e)
                terms[f"cross_nmse/{source}->{t}"] = e.detach()
        terms["cross_nmse"] = (torch.stack(cross_terms).mean() if cross_terms else aux_term.new_zeros(())).detach()
        terms["aux"] = aux_term.detach()
        terms["usae_nmse"] = torch.stack(per_target).mean().detach()
        l0, fired = self._stats(z[source], ids, self.cfg.L)
        terms[f"l0/{source}"] = l0
        return LossOutput(total=torch.stack(weighted).mean() + aux_coef * aux_term, terms=terms, fired={source: fired})

    def usae_paper_loss(self, x: dict[str, Tensor], source: str, lam: float = 1.0) -> LossOutput:
        """USAE step as the USAE paper and its reference code define it (method.md section 3).

        Batchnorm encoder only; ``x^t`` are the inputs L2-normalised and scaled to norm
        ``sqrt(d_t)`` (module docstring). ``s = source`` is encoded alone: pre-codes
        ``p = BN^s(W_enc^s x^s + b_lat^s)`` ``[B, L]`` (batch statistics in training mode, running
        statistics in eval mode), code ``z`` = ``ReLU(p)`` at the top-k of ``p``. For every target
        ``t`` (self included) the reference's criterion (its ``top_k_auxiliary_loss_L1``)::

            E_t = mean_{b,i} |x^t - W_dec^t z|                  (the L1 reconstruction error)
            A_t = mean_{b,i} |(x^t - W_dec^t z) - W_dec^t u|     (the auxiliary term)

        means over the batch and the ``d_t`` dimensions; ``u`` = the ``L // 2`` largest entries of
        ``ReLU(p) - z`` (the unchosen positive pre-codes; at most ``L - k`` of them are non-zero), so
        ``A_t`` is the L1 error of the reconstruction from the top ``min(L, k + L // 2)``
        ReLU'd pre-codes. As in the reference the residual is not detached (``A_t`` also trains the
        top-k code and its decoder rows), ``u`` is not restricted to dead latents, and the targets'
        errors are summed, not averaged::

            total = (E_s + 0.1 A_s) + lam * sum_{t != s} (E_t + 0.1 A_t)

        ``lam`` weights the cross-decoding terms as in :meth:`usae_loss` (``lam = 1`` is the
        reference's loss, ``lam = 0`` self-reconstruction only, cross terms measured without a
        graph). The reference clips gradient norms at 1 (and multiplies the loss by 100 when it
        L2-normalises its inputs instead of standardising them); neither is done here (Adam is
        invariant to the loss scale up to ``eps``). Decoding is dense (``[B, L] @ [L, d]``): ``u``
        holds ``L // 2`` latents.

        Terms: ``l1`` (``sum_t E_t``), ``aux`` (``sum_t A_t``), the NMSE terms of :meth:`usae_loss`
        (``self_nmse``, ``cross_nmse``, ``.../<s>->...``, ``usae_nmse``; NMSE does not depend on
        the input scale) and ``l0/<s>``; ``fired`` holds the source stream only. Dead latents play
        no part (the reference has none).
        """
        self._check_encoder(True, "usae_paper_loss")
        streams = self._check_inputs(x, require_all=True)
        self._check_stream(source)
        lam = float(lam)
        k, L = self.cfg.k, self.cfg.L
        xn = {s: self._prepare(s, x[s]) for s in streams}
        p = self._logits(source, xn[source], batch_stats=self.training)
        idx = torch.topk(p.detach(), min(L, k + L // 2), dim=1).indices  # the top-k first, then u's latents
        values = F.relu(p.gather(1, idx))
        zeros = torch.zeros_like(p)
        codes = torch.cat([zeros.scatter(1, idx[:, :k], values[:, :k]), zeros.scatter(1, idx, values)])
        n = p.shape[0]
        terms: dict[str, Tensor] = {}
        weighted, l1, aux, per_target, cross = [], [], [], [], []
        for t in streams:
            with torch.set_grad_enabled(torch.is_grad_enabled() and (t == source or lam != 0.0)):
                rec = codes @ self.W_dec[t]  # [2B, d_t]: from z, and from z + u
                err = (rec - xn[t].repeat(2, 1)).abs()
                e_t, a_t = err[:n].mean(), err[n:].mean()
                term = e_t + USAE_PAPER_AUX_COEF * a_t
            weighted.append(term if t == source else lam * term)
            l1.append(e_t.detach())
            aux.append(a_t.detach())
            e = nmse(rec[:n].detach(), xn[t])
            per_target.append(e)
            if t == source:
                terms[f"self_nmse/{t}"] = terms["self_nmse"] = e
            else:
                cross.append(e)
                terms[f"cross_nmse/{source}->{t}"] = e
        terms["cross_nmse"] = torch.stack(cross).mean() if cross else per_target[0].new_zeros(())
        terms["usae_nmse"] = torch.stack(per_target).mean()
        terms["l1"] = torch.stack(l1).sum()
        terms["aux"] = torch.stack(aux).sum()
        terms[f"l0/{source}"], fired = self._stats(values[:, :k].detach(), idx[:, :k], L)
        return LossOutput(total=torch.stack(weighted).sum(), terms=terms, fired={source: fired})

    # ------------------------------------------------------------------ maintenance

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Rescale every decoder direction (row of ``W_dec[s]``) to unit L2 norm, in place."""
        for W in self.W_dec.values():
            normalise_rows_(W, INPUT_EPS)

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
            remove_parallel_(g, W, INPUT_EPS)

    @torch.no_grad()
    def revive(self, stream: str, latents: Tensor, generator: torch.Generator,
               scale: float = 0.01) -> list[tuple[nn.Parameter, Tensor]]:
        """Re-initialise dead latents of one stream: encoder rows <- small noise, latent bias <- 0.

        ``latents``: bool ``[L]`` mask or int64 ids. The new rows are ``N(0, scale^2 / d_s)`` per
        entry (norm about ``scale``), drawn from ``generator`` (on its own device). The decoder is
        left as is. The batchnorm encoder's latents also go back to their initial BN state
        (:meth:`LatentBatchNorm.reset_rows`; BN removes the rows' scale, so without it a revived
        row would inherit the dead latent's weight and bias). Returns ``[(W_enc[stream], rows),
        (b_lat[stream], rows)]`` (plus ``(bn.weight, rows), (bn.bias, rows)``) with ``rows`` the
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
        if not self.batchnorm:
            return [(W, rows), (b, rows)]
        bn = self.bn[stream]
        bn.reset_rows(rows)
        return [(W, rows), (b, rows), (bn.weight, rows), (bn.bias, rows)]
