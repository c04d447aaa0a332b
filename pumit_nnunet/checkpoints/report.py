"""What happened to every key when weights were loaded: loaded as-is, converted, missing, unexpected, skipped."""

from __future__ import annotations

from dataclasses import dataclass, field

from pumit_nnunet.checkpoints.format import CheckpointError

__all__ = ["LoadReport"]

_LIST_LIMIT = 12


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LIST_LIMIT])
    return shown + (f", ... ({len(keys) - _LIST_LIMIT} more)" if len(keys) > _LIST_LIMIT else "")


@dataclass
class LoadReport:
    """The fate of every key of a weight transfer.

    ``loaded``: copied unchanged. ``converted``: key -> what was done to it (kernel reduction, channel fold,
    position-embedding resampling ...); these are loaded too. ``missing``: model keys the checkpoint cannot
    provide. ``unexpected``: checkpoint keys with no place in the model. ``skipped``: checkpoint keys left out on
    purpose (pre-training heads, RoPE buffers). ``mismatched``: key -> shapes that cannot be reconciled (a
    different model size). ``initialised``: optional model keys (``mask_token``) kept at their initialisation.
    """

    loaded: list[str] = field(default_factory=list)
    converted: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    mismatched: dict[str, str] = field(default_factory=dict)
    initialised: list[str] = field(default_factory=list)
    source: str = ""
    format: str = ""
    architecture_hint: str = ""

    @property
    def complete(self) -> bool:
        """Every model key received a weight and every checkpoint key was used or skipped on purpose."""
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def num_transferred(self) -> int:
        return len(self.loaded) + len(self.converted)

    def summary(self) -> str:
        """Human-readable multi-line summary (what ``load_vit_weights`` prints)."""
        head = f"weights from {self.source or 'a state dict'}" + (f" [{self.format}]" if self.format else "")
        lines = [
            f"{head}: {len(self.loaded)} loaded, {len(self.converted)} converted, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.mismatched)} mismatched, {len(self.skipped)} skipped"
        ]
        renamed = [k for k, what in self.converted.items() if what.startswith("renamed from")]
        lines += [f"  converted {key}: {what}" for key, what in self.converted.items() if key not in renamed]
        if renamed:  # timm's renames are one per block tensor: count them instead of listing
            lines.append(f"  renamed from timm names: {len(renamed)} keys")
        lines += [f"  mismatched {key}: {what}" for key, what in self.mismatched.items()]
        for name in ("missing", "unexpected", "skipped", "initialised"):
            keys = getattr(self, name)
            if keys:
                lines.append(f"  {name}: {_listing(keys)}")
        if self.architecture_hint and not self.complete:
            lines.append(f"  {self.architecture_hint}")
        return "\n".join(lines)

    def raise_if_incomplete(self) -> None:
        """Raise :class:`CheckpointError` listing what does not match, unless the transfer is complete."""
        if self.complete:
            return
        problems = []
        if self.mismatched:
            problems.append("shape mismatches: " + "; ".join(f"{k} ({v})" for k, v in list(self.mismatched.items())[:_LIST_LIMIT]))
        if self.missing:
            problems.append(f"{len(self.missing)} model keys missing from the checkpoint: {_listing(self.missing)}")
        if self.unexpected:
            problems.append(f"{len(self.unexpected)} checkpoint keys the model does not have: {_listing(self.unexpected)}")
        hint = f"\n{self.architecture_hint}" if self.architecture_hint else ""
        raise CheckpointError(
            f"weights from {self.source or 'a state dict'} do not match the model:\n- " + "\n- ".join(problems) + hint
            + "\n(pass allow_partial=True / --allow-partial to load the matching part only)"
        )
