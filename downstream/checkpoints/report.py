"""What an import did: the report that ``mimbench import`` prints and records keep."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from harness.core.config import EncoderConfig
from pretrain.encoders.arch import arch_label


@dataclass
class ImportReport:
    """What an import did: the family, the target wrapper and config, and every key it did not
    load one-to-one (``dropped`` by reason, ``missing``, ``unexpected``) with the conversions;
    ``assumed``: every architecture value that was neither in the file nor named by the user."""

    source: str
    family: str
    detected: str | None
    container: str | None
    target: str = "vit"
    encoder: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    assumed: list[str] = field(default_factory=list)
    partial: bool = False
    sha256: str | None = None

    def drop(self, reason: str, key: str) -> None:
        self.dropped.setdefault(reason, []).append(key)

    def arch_label(self) -> str:
        """The imported architecture as records name it (prefixed by the wrapper, ``beit:``, unless
        it is the ViT's or a Swin's)."""
        label = arch_label(EncoderConfig.model_validate(self.encoder))
        return label if self.target in ("vit", "swin", "swinv2") else f"{self.target}:{label}"

    def summary(self, limit: int = 20) -> dict[str, Any]:
        """JSON-compatible summary for records (key lists cut to ``limit``)."""
        d = asdict(self)
        for k in ("missing", "unexpected"):
            d[k] = d[k][:limit] + ([f"... {len(d[k]) - limit} more"] if len(d[k]) > limit else [])
        d["dropped"] = {r: (len(v), v[:5]) for r, v in self.dropped.items()}
        return d

    def format(self) -> str:
        """Human-readable lines (what ``mimbench import`` prints)."""
        lines = [
            f"{self.source}: family {self.family}"
            + (
                f" (detected {self.detected})"
                if self.detected and self.detected != self.family
                else ""
            )
            + (f", container '{self.container}'" if self.container else "")
            + f" -> {self.target} encoder {self.encoder.get('arch')} "
            f"(dim {self.encoder.get('embed_dim')}, depth {self.encoder.get('depth')}, heads "
            f"{self.encoder.get('num_heads')}, patch {self.encoder.get('patch_size')}, img "
            f"{self.encoder.get('img_size')}); {self.loaded} tensors loaded"
        ]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  ASSUMED (not in the file, not named): {a}" for a in self.assumed]
        for reason, keys in self.dropped.items():
            lines.append(
                f"  dropped {len(keys)} ({reason}): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            )
        if self.missing:
            lines.append(
                f"  MISSING {len(self.missing)} (left at init): {', '.join(self.missing[:8])}"
            )
        if self.unexpected:
            lines.append(
                f"  UNEXPECTED {len(self.unexpected)} (ignored): {', '.join(self.unexpected[:8])}"
            )
        return "\n".join(lines)
