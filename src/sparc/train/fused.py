"""The fused CPU training step of SPARC: forward, backward, projection, Adam and renormalisation
in a few compiled passes (numba), without autograd and without dense ``[L, d]`` gradients.

:func:`fused_step` does what these five calls do for :meth:`MultiStreamSAE.loss` (Global or Local
TopK, any ``lam``, AuxK on dead latents)::

    out = model.loss(x, lam, dead, aux_coef); out.total.backward()
    model.remove_parallel_grad(); optimizer.step(); model.normalise_decoder()

with the same maths in another summation order (results agree to float rounding; the tests
compare both). The dense encoder matmuls are the model's own (:meth:`MultiStreamSAE._logits`,
oneDNN); everything else is one of these passes, each parallel over samples or over latents, so
that its results do not depend on the number of threads:

1. codes (per sample, each row of the logits read once): Global TopK's index set from the
   summed logits of the streams (or each stream's own, Local TopK), the codes
   ``z = ReLU(h)`` there, and the AuxK picks among the dead latents. The top-k of a row: a
   threshold from a strided sample of it, then a min-heap over the entries above it (int64 keys:
   the value, then the earlier position on ties);
2. decoder pass (per target stream ``t``, per sample ``b``): every source's reconstruction
   ``xhat^(s->t)_b = b_pre^t + sum_j z^s_bj W_dec^t[i^s_bj]`` (rows added four at a time), its
   per-sample NMSE, the gradient of the loss with respect to it
   ``G_bs = w_st 2 (xhat - x^t_b) / (B max(||x^t_b||^2, eps))`` (``w_st`` the pair's weight in
   the total: ``1/n`` for ``s = t``, ``lam / (n (n - 1))`` otherwise, 0 for the cross pairs when
   ``lam == 0``), then the AuxK reconstruction and its gradient likewise, in a second pass while
   the dead latents' rows stay cached;
3. decoder update (per latent ``l`` of ``W_dec^t``, over the occurrences of the latent sorted by
   a counting sort: those of the codes, shared by every target, and those of the AuxK picks): the
   code gradients ``dz^s_bj += <G_bs, w>`` and the gradient row ``g = sum z^s_bj G_bs``, the
   projection ``g <- g - (<g, w> / max(||w||^2, eps)) w``, Adam, and
   ``w <- w / max(||w||, eps)``: one read and one write of the row and its two moments;
4. encoder update (per latent ``l`` of stream ``s``): ``dh = dz [z > 0]`` at each occurrence,
   ``db_lat[l] = sum dh``, ``g = sum dh x_b - db_lat[l] b_pre``, the encoder's share of
   ``db_pre`` (``-db_lat[l] W_enc[l]``, summed over fixed blocks of latents in a fixed order),
   and Adam on the row; then Adam on ``b_lat``;
5. Adam on ``b_pre``.

Adam is ``torch.optim.Adam``'s (no weight decay, no AMSGrad): the moments and step counters live
in the given optimizer's state, in its own format, so checkpoints, revival (which zeroes rows of
the moments) and the unfused path read and write the same state.

:func:`supports` says when the trainer uses it: a CPU, float32, single-process SPARC run of the
linear encoder with Adam as the trainer makes it, without the stream-subset or consistency
options, under the project's decoder order (``DECODER_NORMALISE == "after_step"``). Everything
else takes the autograd path. ``FUSED`` switches it off (the tests compare both).

Memory: the step holds the logits (``[B, L]`` per stream, as the autograd path) and ``[B (n + 1),
d]`` gradient rows per target instead of ``[L, d]`` dense gradients.

Speed (``benchmarks/train_throughput.py``, paper sizes, 2 CPU threads): 1.4-1.5x the floor (the
encoder matmuls and one Adam step), against 2.7-2.9x for the autograd path; docs/benchmarks.md.
The kernels compile on first use (about 15 s) and load from :func:`sparc.model.jit.kernel_cache_dir`
afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numba
import numpy as np
import torch
from numba import prange
from torch import Tensor

from sparc.model import sae as sae_module
from sparc.model.jit import jit
from sparc.model.losses import NMSE_EPS, LossOutput, sparc_objective
from sparc.model.sae import INPUT_EPS, MultiStreamSAE

# Use the fused step where supports() allows it (False: the autograd path everywhere).
FUSED = True
# Latents per block of the encoder update: its share of db_pre is summed block by block, in block
# order, so the sum does not depend on the number of threads.
_BLOCK = 128
# Samples are split into at most this many chunks for the threads (scratch buffers per chunk).
_CHUNKS = 64
# Floating-point flags of the kernels: reassociation (vectorised sums) and fused multiply-adds.
_FAST = {"reassoc", "contract"}


# --------------------------------------------------------------------------- kernels


@jit(nogil=True)
def _key(bits, pos):  # pragma: no cover - compiled
    """An int64 key ordering entries as the top-k wants them: by float32 value (``bits``, its bit
    pattern as int32, made monotonic), then by earlier position (``pos < 2^32``)."""
    b = np.int64(bits)
    b ^= (b >> 31) & 0x7FFFFFFF  # negative floats: reverse their order
    return (b << 32) | (0xFFFFFFFF - pos)


@jit(nogil=True)
def _top_keys(keys, cnt, k, out, heap, positions):  # pragma: no cover - compiled
    """The ``k``-th largest of ``keys[:cnt]`` (:func:`_key`) and, with ``positions``, the
    positions of the ``k`` largest into ``out``, in no order. A min-heap (``heap``: int64 scratch of ``k``) of the
    best ``k`` seen, whose root a key replaces when larger."""
    for i in range(k):
        heap[i] = keys[i]
    for start in range(k // 2 - 1, -1, -1):
        _sift(heap, start, k)
    for c in range(k, cnt):
        if keys[c] > heap[0]:
            heap[0] = keys[c]
            _sift(heap, 0, k)
    if positions:
        for i in range(k):
            out[i] = 0xFFFFFFFF - (heap[i] & 0xFFFFFFFF)
    return heap[0]


@jit(nogil=True)
def _sift(heap, i, k):  # pragma: no cover - compiled
    """Restore the min-heap ``heap[:k]`` below ``i``."""
    while True:
        m = 2 * i + 1
        if m >= k:
            return
        if m + 1 < k and heap[m + 1] < heap[m]:
            m += 1
        if heap[m] >= heap[i]:
            return
        heap[m], heap[i] = heap[i], heap[m]
        i = m


@jit(nogil=True, fastmath=_FAST)
def _select(row, n, k, out, keys, heap):  # pragma: no cover - compiled
    """Positions of the ``k`` largest entries of ``row[:n]`` (float32, contiguous) into ``out``,
    in no particular order; on ties the earlier position wins (``keys``, ``heap``: int64 scratch
    of at least ``n``). A threshold ``t`` from a strided sample of the row
    (its ``j``-th largest key, ``j`` chosen so that with overwhelming probability at least ``k``
    entries reach it), then a selection among the entries that reach ``t``; among all entries
    when fewer than ``k`` do."""
    bits = row.view(np.int32)
    q = n // (4 * k)
    if q >= 2:
        ns = (n + q - 1) // q
        for i in range(ns):
            keys[i] = _key(bits[i * q], i * q)
        lam = k * ns / n  # expected sample entries among the row's top k
        j = min(ns, int(lam + 4.0 * math.sqrt(lam) + 2.0))
        t = _top_keys(keys, ns, j, out, heap, False)
        cnt = 0
        for c in range(n):  # without a branch: write every key, keep those that reach t
            key = _key(bits[c], c)
            keys[cnt] = key
            cnt += key >= t
        if cnt >= k:
            _top_keys(keys, cnt, k, out, heap, True)
            return
    for c in range(n):
        keys[c] = _key(bits[c], c)
    _top_keys(keys, n, k, out, heap, True)


@jit(nogil=True, fastmath=_FAST)
def _add_rows(r, W, ids, vals, m, nz):  # pragma: no cover - compiled
    """``r += sum_{j < m} vals[j] W[ids[j]]`` over the non-zero ``vals`` (``nz``: int64 scratch of
    ``m``), four rows at a time: four streams of memory reads in flight, and ``r`` read and
    written once per four rows."""
    d = r.shape[0]
    cnt = 0
    for j in range(m):
        nz[cnt] = j
        cnt += vals[j] != 0.0
    q = 0
    while q + 3 < cnt:
        j0, j1, j2, j3 = nz[q], nz[q + 1], nz[q + 2], nz[q + 3]
        v0, v1, v2, v3 = vals[j0], vals[j1], vals[j2], vals[j3]
        w0, w1, w2, w3 = W[ids[j0]], W[ids[j1]], W[ids[j2]], W[ids[j3]]
        for c in range(d):
            r[c] += (v0 * w0[c] + v1 * w1[c]) + (v2 * w2[c] + v3 * w3[c])
        q += 4
    while q < cnt:
        v0, w0 = vals[nz[q]], W[ids[nz[q]]]
        for c in range(d):
            r[c] += v0 * w0[c]
        q += 1


@jit(nogil=True, parallel=True, fastmath=_FAST)
def _codes(h, k, shared, dcols, doff, maux, idx, z, aidx, aval):  # pragma: no cover - compiled
    """Step 1 of the module docstring, per sample (each row of the logits read once).

    ``h``: a tuple of ``n`` logits ``[B, L]``. ``shared``: Global TopK, ``idx[s, b] =
    top-k(sum_s h[s][b])`` for every ``s`` (the sum in stream order, as
    :func:`sparc.model.topk.global_topk`); else each stream's own top-k. ``z[s, b, j] =
    max(h[s][b, idx[s, b, j]], 0)``. AuxK: stream ``s``'s dead latents are
    ``dcols[doff[s]:doff[s + 1]]``; ``aidx[s, b, :maux[s]]`` are its ``maux[s]`` largest logits
    among them and ``aval`` their ReLU. On ties the earlier position is chosen.
    """
    n = len(h)
    B, L = h[0].shape
    chunks = min(B, _CHUNKS)
    for ch in prange(chunks):
        row = np.empty(L, np.float32)
        keys = np.empty(L, np.int64)
        sel = np.empty(max(k, aidx.shape[2]), np.int64)
        heap = np.empty(L, np.int64)
        for b in range(ch * B // chunks, (ch + 1) * B // chunks):
            if shared:
                h0 = h[0]
                for c in range(L):
                    row[c] = h0[b, c]
                for s in range(1, n):
                    hs = h[s]
                    for c in range(L):
                        row[c] += hs[b, c]
                _select(row, L, k, idx[0, b], keys, heap)
                for s in range(1, n):
                    for j in range(k):
                        idx[s, b, j] = idx[0, b, j]
            for s in range(n):
                hs = h[s]
                if not shared:
                    _select(hs[b], L, k, idx[s, b], keys, heap)
                for j in range(k):
                    z[s, b, j] = max(hs[b, idx[s, b, j]], np.float32(0.0))
                m = maux[s]
                if m > 0:
                    nd = doff[s + 1] - doff[s]
                    for c in range(nd):
                        row[c] = hs[b, dcols[doff[s] + c]]
                    _select(row, nd, m, sel, keys, heap)
                    for j in range(m):
                        col = dcols[doff[s] + sel[j]]
                        aidx[s, b, j] = col
                        aval[s, b, j] = max(hs[b, col], np.float32(0.0))


@jit(nogil=True, parallel=True, fastmath=_FAST)
def _decoder_pass(W, bpre, x, idx, z, wts, self_src, aidx, aval, wa, aux_ref, nm, an, G, gsum):  # pragma: no cover
    """Step 2 of the module docstring for one target stream (per sample ``b``, in parallel).

    ``W [L, d]`` its decoder, ``bpre [d]``, ``x [B, d]`` its normalised inputs; sources ``s``:
    ``idx, z [n, B, k]`` index sets and codes, ``wts [n]`` pair weights; ``self_src`` the
    target's own source; AuxK: ``aidx, aval [B, m]`` (``m`` may be 0), weight ``wa``,
    ``aux_ref``: the reference's denominator ``||r + b_pre||^2``. Writes ``nm [B, n]`` and
    ``an [B]`` per-sample NMSE and ``G [B n + B, d]`` gradient rows (row ``b n + s``, AuxK row
    ``B n + b``) and ``gsum [chunks, d]``, the sums of the chunks' reconstruction gradient rows
    (``b_pre``'s gradient from the decoder: their sum). The code gradients are left to
    :func:`_decoder_update`, which reads each latent's row once for all its occurrences.
    """
    n, B, k = idx.shape
    d = W.shape[1]
    m = aidx.shape[1]
    chunks = min(B, _CHUNKS)
    for ch in prange(chunks):
        rec = np.empty((n, d), np.float32)
        nz = np.empty(k, np.int64)
        part = gsum[ch]
        for c in range(d):
            part[c] = 0.0
        for b in range(ch * B // chunks, (ch + 1) * B // chunks):
            xb = x[b]
            den = np.float32(0.0)
            for c in range(d):
                den += xb[c] * xb[c]
            den = max(den, np.float32(NMSE_EPS))
            for s in range(n):
                for c in range(d):
                    rec[s, c] = bpre[c]
            for s in range(n):
                _add_rows(rec[s], W, idx[s, b], z[s, b], k, nz)
            for s in range(n):
                r = rec[s]
                sq = np.float32(0.0)
                for c in range(d):
                    e = r[c] - xb[c]
                    sq += e * e
                nm[b, s] = sq / den
                scale = np.float32(wts[s] * 2.0 / (B * den))
                g = G[b * n + s]
                for c in range(d):
                    g[c] = scale * (r[c] - xb[c])
                    part[c] += g[c]
                if s == self_src and m > 0:  # the AuxK target x - xhat^(t->t), for the second pass
                    resid = G[B * n + b]
                    for c in range(d):
                        resid[c] = xb[c] - r[c]
    if m == 0:
        return
    # AuxK in a second pass: its rows (the dead latents') stay in the caches from sample to sample
    for ch in prange(chunks):
        e_aux = np.empty(d, np.float32)
        nz = np.empty(m, np.int64)
        for b in range(ch * B // chunks, (ch + 1) * B // chunks):
            resid = G[B * n + b]  # holds x - xhat^(t->t) until its gradient replaces it
            for c in range(d):
                e_aux[c] = 0.0
            _add_rows(e_aux, W, aidx[b], aval[b], m, nz)
            denr = np.float32(0.0)
            sq = np.float32(0.0)
            for c in range(d):
                t = resid[c] + bpre[c] if aux_ref else resid[c]
                denr += t * t
                e = e_aux[c] - resid[c]
                sq += e * e
            denr = max(denr, np.float32(NMSE_EPS))
            an[b] = sq / denr
            scale = np.float32(wa * 2.0 / (B * denr))
            for c in range(d):
                resid[c] = scale * (e_aux[c] - resid[c])


@jit(nogil=True)
def _csr(L, keys, rows, coef, pos, count):  # pragma: no cover - compiled
    """Counting sort of the first ``count`` occurrences by latent ``keys``: ``ptr [L + 1]`` and,
    in that order (input order within a latent), their ``rows``, ``coef`` and ``pos``."""
    ptr = np.zeros(L + 1, np.int64)
    for i in range(count):
        ptr[keys[i] + 1] += 1
    for lat in range(L):
        ptr[lat + 1] += ptr[lat]
    fill = ptr[:-1].copy()
    out_rows = np.empty(count, np.int64)
    out_coef = np.empty(count, np.float32)
    out_pos = np.empty(count, np.int64)
    for i in range(count):
        p = fill[keys[i]]
        out_rows[p] = rows[i]
        out_coef[p] = coef[i]
        out_pos[p] = pos[i]
        fill[keys[i]] = p + 1
    return ptr, out_rows, out_coef, out_pos


@jit(nogil=True)
def _occurrences(L, idx, z, row0, pos0):  # pragma: no cover - compiled
    """The non-zero entries of codes ``z`` at latents ``idx`` (both ``[n, B, m]``), sorted by latent
    (:func:`_csr`): ``(b, s, j)`` with ``z[s, b, j] != 0``, table row ``row0 + b n + s``,
    coefficient ``z``, position ``pos0 + (s B + b) m + j`` of the code gradients.

    For the sources' codes (``row0 = pos0 = 0``) the list is the same for every target decoder: a
    source whose pair weight is 0 has zero gradient rows, so its occurrences add nothing there.
    One stream's AuxK picks ``[B, m]`` are passed as ``n = 1`` (``aidx[None]``), with their rows
    and positions after the codes'."""
    n, B, m = idx.shape
    size = n * B * m
    keys = np.empty(size, np.int64)
    rows = np.empty(size, np.int64)
    coef = np.empty(size, np.float32)
    pos = np.empty(size, np.int64)
    cnt = 0
    for b in range(B):
        for s in range(n):
            for j in range(m):
                v = z[s, b, j]
                if v != 0.0:
                    keys[cnt] = idx[s, b, j]
                    rows[cnt] = row0 + b * n + s
                    coef[cnt] = v
                    pos[cnt] = pos0 + (s * B + b) * m + j
                    cnt += 1
    return _csr(L, keys, rows, coef, pos, cnt)


@jit(nogil=True)
def _encoder_occurrences(L, idx, z, dz, aidx, aval, da):  # pragma: no cover - compiled
    """The occurrences of one stream's encoder latents (:func:`_csr`): ``(b, j)`` with
    ``z[b, j] > 0`` (coefficient ``dz``: the ReLU passes the gradient), then the AuxK picks with
    ``aval > 0`` (coefficient ``da``); table row ``b`` (the sample)."""
    B, k = idx.shape
    m = aidx.shape[1]
    size = B * (k + m)
    keys = np.empty(size, np.int64)
    rows = np.empty(size, np.int64)
    coef = np.empty(size, np.float32)
    cnt = 0
    for b in range(B):
        for j in range(k):
            if z[b, j] > 0.0:
                keys[cnt] = idx[b, j]
                rows[cnt] = b
                coef[cnt] = dz[b, j]
                cnt += 1
        for j in range(m):
            if aval[b, j] > 0.0:
                keys[cnt] = aidx[b, j]
                rows[cnt] = b
                coef[cnt] = da[b, j]
                cnt += 1
    return _csr(L, keys, rows, coef, rows, cnt)


@jit(nogil=True, fastmath=_FAST)
def _gather_grad(g, w, G, rows, coef, pos, p, end, dcode):  # pragma: no cover - compiled
    """For the occurrences ``p:end`` of one latent (row ``w``): ``dcode[pos] += <G[row], w>`` and
    ``g += coef G[row]``, four occurrences at a time (``g`` read and written once per four)."""
    d = g.shape[0]
    while p + 3 < end:
        cf0, cf1, cf2, cf3 = coef[p], coef[p + 1], coef[p + 2], coef[p + 3]
        g0, g1, g2, g3 = G[rows[p]], G[rows[p + 1]], G[rows[p + 2]], G[rows[p + 3]]
        acc0 = acc1 = acc2 = acc3 = np.float32(0.0)
        for c in range(d):
            wc = w[c]
            acc0 += g0[c] * wc
            acc1 += g1[c] * wc
            acc2 += g2[c] * wc
            acc3 += g3[c] * wc
            g[c] += (cf0 * g0[c] + cf1 * g1[c]) + (cf2 * g2[c] + cf3 * g3[c])
        dcode[pos[p]] += acc0
        dcode[pos[p + 1]] += acc1
        dcode[pos[p + 2]] += acc2
        dcode[pos[p + 3]] += acc3
        p += 4
    while p < end:
        cf0 = coef[p]
        g0 = G[rows[p]]
        acc0 = np.float32(0.0)
        for c in range(d):
            acc0 += g0[c] * w[c]
            g[c] += cf0 * g0[c]
        dcode[pos[p]] += acc0
        p += 1


@jit(nogil=True, parallel=True, fastmath=_FAST)
def _decoder_update(W, m1, m2, occ, aux, G, dcode, c1, b2, c2, step, bc2s, eps, row_eps):  # pragma: no cover
    """Step 3 of the module docstring for one decoder ``W [L, d]`` with moments ``m1, m2``: per
    latent ``lat``, for each of its occurrences in ``occ`` (the codes') and ``aux`` (the AuxK
    picks'), both ``(ptr, rows, coef, pos)`` of :func:`_csr`, the code gradient
    ``dcode[pos] += <G[row], W[lat]>`` and ``g += coef G[row]``; then the projection of ``g``,
    Adam (:class:`_AdamState`'s constants) and the renormalisation."""
    L, d = W.shape
    blocks = (L + _BLOCK - 1) // _BLOCK
    for blk in prange(blocks):
        g = np.empty(d, np.float32)
        for lat in range(blk * _BLOCK, min(L, (blk + 1) * _BLOCK)):
            w, a, v = W[lat], m1[lat], m2[lat]
            touched = occ[0][lat] < occ[0][lat + 1] or aux[0][lat] < aux[0][lat + 1]
            f = np.float32(0.0)
            if touched:
                for c in range(d):
                    g[c] = 0.0
                for o in (occ, aux):
                    _gather_grad(g, w, G, o[1], o[2], o[3], o[0][lat], o[0][lat + 1], dcode)
                dot = np.float32(0.0)
                sq = np.float32(0.0)
                for c in range(d):
                    dot += g[c] * w[c]
                    sq += w[c] * w[c]
                f = dot / max(sq, np.float32(row_eps))
            nrm = np.float32(0.0)
            for c in range(d):
                gc = g[c] - f * w[c] if touched else np.float32(0.0)  # the projected gradient
                a[c] += c1 * (gc - a[c])
                v[c] = b2 * v[c] + c2 * gc * gc
                w[c] -= step * a[c] / (np.sqrt(v[c]) / bc2s + eps)
                nrm += w[c] * w[c]
            scale = np.float32(1.0) / max(np.float32(math.sqrt(nrm)), np.float32(row_eps))
            for c in range(d):
                w[c] = w[c] * scale


@jit(nogil=True, parallel=True, fastmath=_FAST)
def _encoder_update(W, m1, m2, ptr, rows, coef, x, bpre, dlat, dpre_blocks,
                    c1, b2, c2, step, bc2s, eps):  # pragma: no cover - compiled
    """Step 4 of the module docstring for one encoder ``W [L, d]`` (moments ``m1, m2``): per
    latent, ``dh`` summed into ``dlat[lat] = sum dh`` (the latent bias's gradient) and
    ``g = sum dh (x[row] - bpre) = sum dh x[row] - dlat[lat] bpre``;
    ``dpre_blocks[block] -= dlat[lat] W[lat]`` (the row before its update); Adam on the row."""
    L, d = W.shape
    blocks = (L + _BLOCK - 1) // _BLOCK
    for blk in prange(blocks):
        g = np.empty(d, np.float32)
        part = dpre_blocks[blk]
        for c in range(d):
            part[c] = 0.0
        for lat in range(blk * _BLOCK, min(L, (blk + 1) * _BLOCK)):
            w, a, v = W[lat], m1[lat], m2[lat]
            touched = ptr[lat] < ptr[lat + 1]
            db = np.float32(0.0)
            if touched:
                for c in range(d):
                    g[c] = 0.0
                p, end = ptr[lat], ptr[lat + 1]
                while p + 3 < end:  # four occurrences at a time: g is read and written once
                    cf0, cf1, cf2, cf3 = coef[p], coef[p + 1], coef[p + 2], coef[p + 3]
                    db += (cf0 + cf1) + (cf2 + cf3)
                    x0, x1, x2, x3 = x[rows[p]], x[rows[p + 1]], x[rows[p + 2]], x[rows[p + 3]]
                    for c in range(d):
                        g[c] += (cf0 * x0[c] + cf1 * x1[c]) + (cf2 * x2[c] + cf3 * x3[c])
                    p += 4
                while p < end:
                    cf0 = coef[p]
                    db += cf0
                    x0 = x[rows[p]]
                    for c in range(d):
                        g[c] += cf0 * x0[c]
                    p += 1
                for c in range(d):
                    g[c] -= db * bpre[c]
                for c in range(d):
                    part[c] -= db * w[c]
            for c in range(d):
                gc = g[c] if touched else np.float32(0.0)
                a[c] += c1 * (gc - a[c])
                v[c] = b2 * v[c] + c2 * gc * gc
                w[c] -= step * a[c] / (np.sqrt(v[c]) / bc2s + eps)
            dlat[lat] = db


@jit(nogil=True, fastmath=_FAST)
def _adam_vector(p, g, m1, m2, c1, b2, c2, step, bc2s, eps):  # pragma: no cover - compiled
    """Adam on a 1-D parameter ``p`` with gradient ``g``."""
    for c in range(p.shape[0]):
        m1[c] += c1 * (g[c] - m1[c])
        m2[c] = b2 * m2[c] + c2 * g[c] * g[c]
        p[c] -= step * m1[c] / (np.sqrt(m2[c]) / bc2s + eps)


# --------------------------------------------------------------------------- the step


def supports(model: MultiStreamSAE, optimizer: torch.optim.Optimizer, *, method: str = "sparc",
             keep: bool = False, consistency: float = 0.0, processes: int = 1,
             decoder_order: str = "after_step") -> bool:
    """Whether :func:`fused_step` can train ``model`` with ``optimizer`` (module docstring)."""
    if not FUSED or method != "sparc" or keep or consistency or processes != 1 or decoder_order != "after_step":
        return False
    if model.batchnorm or sae_module.AUX_DENOMINATOR not in ("residual", "reference"):
        return False
    params = list(model.parameters())
    if any(p.device.type != "cpu" or p.dtype != torch.float32 or not p.is_contiguous() for p in params):
        return False
    if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
        return False
    group = optimizer.param_groups[0]
    plain = (group["weight_decay"] == 0 and not group["amsgrad"] and not group["maximize"]
             and not isinstance(group["lr"], Tensor))
    return plain and {id(p) for p in group["params"]} == {id(p) for p in params}


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


class _AdamState:
    """The optimizer's per-parameter state in torch's format, stepped by the kernels."""

    def __init__(self, optimizer: torch.optim.Adam) -> None:
        group = optimizer.param_groups[0]
        self.lr = float(group["lr"])
        self.b1, self.b2 = (float(b) for b in group["betas"])
        self.eps = float(group["eps"])
        self.optimizer = optimizer

    def take(self, p: Tensor) -> tuple[np.ndarray, np.ndarray, tuple[np.float32, ...]]:
        """The moments of ``p`` (created as torch does on its first step) after advancing its step
        counter, and the float32 constants of its update ``(1 - beta1, beta2, 1 - beta2,
        lr / bias_correction1, sqrt(bias_correction2), eps)``: ``m1 += (1 - beta1) (g - m1)``,
        ``m2 = beta2 m2 + (1 - beta2) g^2``, ``p -= lr / bc1 * m1 / (sqrt(m2) / sqrt(bc2) + eps)``
        (torch's fused Adam)."""
        st = self.optimizer.state[p]
        if not st:
            fused = bool(self.optimizer.param_groups[0].get("fused"))
            st["step"] = torch.tensor(0.0, dtype=torch.float32) if fused else torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["step"] += 1
        step = float(st["step"])
        bc1 = 1.0 - self.b1**step
        bc2s = math.sqrt(1.0 - self.b2**step)
        f = np.float32
        consts = (f(1.0 - self.b1), f(self.b2), f(1.0 - self.b2), f(self.lr / bc1), f(bc2s), f(self.eps))
        return _np(st["exp_avg"]), _np(st["exp_avg_sq"]), consts


@torch.no_grad()
def fused_step(model: MultiStreamSAE, optimizer: torch.optim.Adam, x: Mapping[str, Tensor], lam: float,
               dead: Mapping[str, Tensor] | None = None, aux_coef: float = 1 / 32) -> LossOutput:
    """One training step of ``model.loss(x, lam, dead, aux_coef)`` with ``optimizer`` (module
    docstring); returns the loss terms as that method does (``total`` without a graph)."""
    streams = model._check_inputs(x, require_all=True)
    dead_m = model._check_dead(dead)
    lam = float(lam)
    cfg = model.cfg
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))  # torch's setting
    n, k, L = len(streams), cfg.k, cfg.L
    xn = {s: model._prepare(s, x[s]).contiguous() for s in streams}
    h = {s: model._logits(s, xn[s]).contiguous() for s in streams}
    hn = {s: _np(h[s]) for s in streams}
    B = next(iter(xn.values())).shape[0]
    # AuxK: the min(k_aux, #dead) largest logits among each stream's dead latents (the live picks
    # of sparc.model.topk.aux_topk, whose values are zeroed there, are left out)
    dead_cols = [dead_m[s].nonzero().view(-1).numpy() if s in dead_m else np.empty(0, np.int64) for s in streams]
    n_dead = np.array([c.shape[0] for c in dead_cols], np.int64)
    maux = np.minimum(n_dead, cfg.k_aux)
    idx = np.empty((n, B, k), np.int64)
    z = np.empty((n, B, k), np.float32)
    aidx_all = np.empty((n, B, int(maux.max(initial=0))), np.int64)
    aval_all = np.empty(aidx_all.shape, np.float32)
    _codes(tuple(hn[s] for s in streams), k, cfg.topk == "global", np.concatenate(dead_cols).astype(np.int64),
           np.concatenate([[0], np.cumsum(n_dead)]), maux, idx, z, aidx_all, aval_all)
    aux: dict[str, tuple[np.ndarray, np.ndarray, int]] = {
        s: (np.ascontiguousarray(aidx_all[i, :, : maux[i]]), np.ascontiguousarray(aval_all[i, :, : maux[i]]),
            int(n_dead[i]))
        for i, s in enumerate(streams) if s in dead_m
    }

    adam = _AdamState(optimizer)
    pair_w = np.float32(lam / (n * (n - 1))) if n > 1 else np.float32(0.0)
    aux_ref = sae_module.AUX_DENOMINATOR == "reference"
    none_idx, none_val = np.empty((B, 0), np.int64), np.empty((B, 0), np.float32)
    # code gradients: [n, B, k] of the sources, then [B, m_s] of each stream's AuxK picks
    dcodes = {s: np.zeros(n * B * k + B * aux.get(s, (none_idx,))[0].shape[1], np.float32) for s in streams}
    M = np.empty((n, n), np.float32)  # [source, target] NMSE
    aux_terms: dict[str, float] = {}
    dpre: dict[str, np.ndarray] = {}
    occ = _occurrences(L, idx, z, 0, 0)
    for ti, t in enumerate(streams):
        W = model.W_dec[t]
        d = W.shape[1]
        wts = np.full(n, pair_w, np.float32)
        wts[ti] = np.float32(1.0 / n)
        aidx, aval, n_dead = aux.get(t, (none_idx, none_val, 0))
        if not n_dead:
            aidx, aval = none_idx, none_val
        nm = np.empty((B, n), np.float32)
        an = np.zeros(B, np.float32)
        G = np.empty((B * n + B, d), np.float32)
        gsum = np.empty((min(B, _CHUNKS), d), np.float32)
        _decoder_pass(_np(W), _np(model.b_pre[t]), _np(xn[t]), idx, z, wts, ti,
                      aidx, aval, np.float32(aux_coef / n), aux_ref, nm, an, G, gsum)
        M[:, ti] = nm.mean(0, dtype=np.float64)
        if t in aux:
            aux_terms[t] = float(an.mean(dtype=np.float64)) if n_dead else 0.0
        dpre[t] = gsum.sum(0)  # decoder share of db_pre
        m1, m2, consts = adam.take(W)
        aux_occ = _occurrences(L, aidx[np.newaxis], aval[np.newaxis], B * n, n * B * k)
        _decoder_update(_np(W), m1, m2, occ, aux_occ, G, dcodes[t],
                        *consts, np.float32(INPUT_EPS))
    dz = sum(dc[: n * B * k] for dc in dcodes.values()).reshape(n, B, k)

    for si, s in enumerate(streams):
        Wenc = model.W_enc[s]
        d = Wenc.shape[1]
        aidx, aval, n_dead = aux.get(s, (none_idx, none_val, 0))
        if not n_dead:
            aidx, aval = none_idx, none_val
        da = dcodes[s][n * B * k:].reshape(B, aidx.shape[1])
        ptr, orow, ocoef, _ = _encoder_occurrences(L, idx[si], z[si], dz[si], aidx, aval, da)
        blocks = np.empty(((L + _BLOCK - 1) // _BLOCK, d), np.float32)
        dlat = np.empty(L, np.float32)
        m1, m2, consts = adam.take(Wenc)
        _encoder_update(_np(Wenc), m1, m2, ptr, orow, ocoef, _np(xn[s]), _np(model.b_pre[s]), dlat, blocks, *consts)
        bm1, bm2, bconsts = adam.take(model.b_lat[s])
        _adam_vector(_np(model.b_lat[s]), dlat, bm1, bm2, *bconsts)
        g_pre = dpre[s] + blocks.sum(0)
        pm1, pm2, pconsts = adam.take(model.b_pre[s])
        _adam_vector(_np(model.b_pre[s]), g_pre, pm1, pm2, *pconsts)

    return _loss_output(streams, M, lam, aux_coef, aux_terms, z, idx, L)


def _loss_output(streams: list[str], M: np.ndarray, lam: float, aux_coef: float, aux_terms: dict[str, float],
                 z: np.ndarray, idx: np.ndarray, L: int) -> LossOutput:
    """The terms of :meth:`MultiStreamSAE.loss` (:func:`sparc.model.losses.sparc_objective`) from
    the NMSE matrix, AuxK terms and codes."""
    l0: dict[str, Tensor] = {}
    fired: dict[str, Tensor] = {}
    for i, s in enumerate(streams):
        l0[s] = torch.from_numpy(z[i] > 0).sum(1).float().mean()
        hits = np.zeros(L, np.bool_)
        hits[idx[i][z[i] > sae_module.FIRE_THRESHOLD]] = True
        fired[s] = torch.from_numpy(hits)
    aux = {s: torch.tensor(a, dtype=torch.float32) for s, a in aux_terms.items()}
    total, terms = sparc_objective(streams, torch.from_numpy(M), aux, lam, aux_coef, l0)
    return LossOutput(total=total, terms=terms, fired=fired)
