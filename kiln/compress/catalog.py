"""The compression variants, next to the code that builds them (kiln.compress). Torch-free: params validation reads
it. A new float variant is an entry naming its builder (kiln.compress.recovery.Builder) and how it trains; its
`_int8` twin is derived. The stage's table, export and selection take every variant alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Variant:
    """A float variant: `fp32` is the trained model; the others are rebuilt by `builder` before each training round
    (from the trained weights, or fresh), trained on the labels or on the teacher's logits (`taught`), under the
    `pruned` params (prune_rounds x recovery_epochs, cosine from recovery_lr) or the `student` ones (student_epochs,
    one-cycle at student_lr). `X_int8` is X exported to ONNX and int8-quantized."""

    builder: str | None = None  # "module:function"; None: fp32, the trained model as it is
    schedule: Literal["pruned", "student"] = "pruned"
    taught: bool = False  # distilled from the trained model's logits (compress.distill_*)


FLOATS: dict[str, Variant] = {
    "fp32": Variant(),
    "pruned": Variant(builder="kiln.compress.recovery:pruned"),
    "pruned_kd": Variant(builder="kiln.compress.recovery:pruned", taught=True),
    "distilled": Variant(builder="kiln.compress.recovery:student", schedule="student", taught=True),
    "student": Variant(builder="kiln.compress.recovery:student", schedule="student"),
}
BASELINE = "fp32"
INT8_SUFFIX = "_int8"


def float_source(variant: str) -> str:
    """The float variant `variant` is or quantizes: int8 -> fp32, pruned_kd_int8 -> pruned_kd, pruned -> pruned."""
    return BASELINE if variant == "int8" else variant.removesuffix(INT8_SUFFIX)


VARIANTS: tuple[str, ...] = ("fp32", "int8", *(f"{name}{suffix}" for name in FLOATS if name != BASELINE
                                               for suffix in ("", INT8_SUFFIX)))
RECOVERED: tuple[str, ...] = tuple(name for name, variant in FLOATS.items() if variant.builder)
