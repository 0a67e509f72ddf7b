"""Record-level differential privacy for local LoRA training, Flower-free.

`accounting`: sampling rate, noise calibration, ε of a step history and the per-client ledger;
`dpsgd`: the DP-SGD local steps (Poisson batches, Opacus per-sample clipping, Gaussian noise);
`report`: what the `fedlora privacy plan|report` commands compute; `cache`: the on-disk memo of the
accountant's slow answers; `audit`: `fedlora privacy audit`, an empirical lower bound on ε from one
DP-SGD run with canaries (not imported here: it needs the model code of `fedlora.core`). Opacus
is imported only when a function needs it, so importing this package is cheap.
"""

from __future__ import annotations

from .accounting import (
    ACCOUNTANTS,
    Participation,
    PrivacyError,
    PrivacyLedger,
    epsilon,
    noise_for,
    noise_multiplier,
    sample_rate,
)
from .dpsgd import GRAD_SAMPLE_MODES, REPRODUCIBLE_WARNING, DPSettings, dp_sgd_steps, poisson_batch
from .report import ledger_path, load_ledgers

__all__ = [
    "ACCOUNTANTS",
    "GRAD_SAMPLE_MODES",
    "DPSettings",
    "Participation",
    "PrivacyError",
    "PrivacyLedger",
    "REPRODUCIBLE_WARNING",
    "dp_sgd_steps",
    "epsilon",
    "ledger_path",
    "load_ledgers",
    "noise_for",
    "noise_multiplier",
    "poisson_batch",
    "sample_rate",
]
