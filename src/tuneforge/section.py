"""The base of every recipe section (tuneforge.recipe and each method's config
in tuneforge.methods), kept in a leaf module so both import it without a cycle."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

MAX_RANK = 4096  # method r: far above any sensible rank, low enough that a typo is refused


class Section(BaseModel):
    """Every recipe section: unknown keys refused, assignments validated, and no
    float field takes inf or nan (`.inf` would train with lr nan)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class MethodSection(Section):
    """The `method:` section of one method (each module's Config): its fields,
    `name: Literal[...]` as the tag, and what the rest of tuneforge asks of it."""

    def describe(self) -> str:
        """One line for reports and model cards."""
        return self.name

    def hints(self) -> list[str]:
        """What to try when a run with this method ends no better than its baseline."""
        return []

    def load_options(self) -> dict:
        """Extra from_pretrained settings the method needs (qlora: a 4-bit base)."""
        return {}
