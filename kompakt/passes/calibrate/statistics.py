"""Statistics of one activation (a MatMul's input) over the calibration set.

Kinds a pass can request (all are collected in the same run of a stage, so passes that need
several share one pass over the data):
- ``hessian``: H = XᵀX / n over all tokens, [K, K] (GPTQ, mixed precision);
- ``absmean``: mean |x| per channel, [K] (AWQ's salience);
- ``absmax``: max |x| per channel, [K] (SmoothQuant, outlier detection);
- ``samples``: up to `MAX_SAMPLES` token rows, [n, K], to measure output error (AWQ searches);
- ``tensors``: the whole value, as computed, for the first ``keep_batches`` batches (the inputs
  of a subgraph a pass wants to re-run, such as AWQ's inspected module).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kompakt.errors import KompaktError

KINDS = frozenset({"hessian", "absmean", "absmax", "samples", "tensors"})
MAX_SAMPLES = 4096

StatRequests = Mapping[int, set[str]]
"""``id(activation value)`` -> the kinds of statistics wanted for it."""


class ActivationStats:
    def __init__(self, kinds: set[str], keep_batches: int = 0) -> None:
        unknown = set(kinds) - KINDS
        if unknown:
            raise ValueError(f"unknown statistic kinds {sorted(unknown)}; known: {sorted(KINDS)}")
        self.kinds = frozenset(kinds)
        self.tokens = 0
        self.nonfinite = False
        self._hessian: torch.Tensor | None = None
        self._abssum: torch.Tensor | None = None
        self._absmax: torch.Tensor | None = None
        self._samples: list[torch.Tensor] = []
        self._sample_stride = 1
        self.keep_batches = keep_batches
        self.tensors: list[torch.Tensor] = []

    def add(self, tensor: torch.Tensor) -> None:
        if "tensors" in self.kinds and len(self.tensors) < self.keep_batches:
            self.tensors.append(tensor.detach())
        if not self.kinds - {"tensors"}:
            self.tokens += 1
            return
        x = tensor.detach().reshape(-1, tensor.shape[-1]).float()
        if not torch.isfinite(x).all():
            self.nonfinite = True
            return
        self.tokens += x.shape[0]
        if "hessian" in self.kinds:
            if self._hessian is None:
                self._hessian = x.T @ x
            else:  # in place: no second K x K temporary (485 MB at K = 11008)
                self._hessian.addmm_(x.T, x)
        if "absmean" in self.kinds:
            s = x.abs().sum(0)
            self._abssum = s if self._abssum is None else self._abssum + s
        if "absmax" in self.kinds:
            m = x.abs().amax(0)
            self._absmax = m if self._absmax is None else torch.maximum(self._absmax, m)
        if "samples" in self.kinds:
            self._samples.append(x[:: self._sample_stride].clone())
            if sum(s.shape[0] for s in self._samples) > 2 * MAX_SAMPLES:
                # keep every other row from now on, and thin what is kept the same way
                self._samples = [s[::2] for s in self._samples]
                self._sample_stride *= 2

    def finish(self, label: str) -> None:
        if self.nonfinite:
            raise KompaktError(
                f"calibration: the {label} contains NaN or Inf on the calibration data"
            )
        if self.tokens == 0:
            raise KompaktError(
                f"calibration: the {label} was never computed on the calibration data"
            )
        if self._hessian is not None:
            self._hessian /= self.tokens  # in place: a Hessian can be hundreds of MB

    @property
    def hessian(self) -> torch.Tensor:
        """E[xᵀx] over the calibration tokens (valid after `finish`)."""
        return self._hessian

    @property
    def absmean(self) -> torch.Tensor:
        return self._abssum / max(self.tokens, 1)

    @property
    def absmax(self) -> torch.Tensor:
        return self._absmax

    @property
    def samples(self) -> torch.Tensor:
        rows = torch.cat(self._samples) if self._samples else torch.empty(0)
        if rows.shape[0] > MAX_SAMPLES:
            rows = rows[torch.linspace(0, rows.shape[0] - 1, MAX_SAMPLES).long()]
        return rows

    def nbytes(self) -> int:
        """Memory held by the statistics (for the calibration memory report)."""
        tensors = [
            t for t in (self._hessian, self._abssum, self._absmax) if t is not None
        ] + self._samples
        return sum(t.numel() * t.element_size() for t in tensors)
