"""Training history: per-epoch losses, dropped simulations, wall time, plot."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["History"]


@dataclass
class History:
    """What happened during training.

    Attributes:
        train_loss: mean training loss per epoch.
        val_loss: validation loss per epoch (empty without a validation set).
        wall_time: seconds since training started, at the end of each epoch.
        num_steps: optimizer steps taken in total.
        num_simulations: simulations used for training (valid ones).
        num_invalid: simulations dropped for NaN/inf values.
        best_epoch: epoch (0-based) whose weights were kept.
        stopped_early: whether early stopping ended training.
    """

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    wall_time: list[float] = field(default_factory=list)
    num_steps: int = 0
    num_simulations: int = 0
    num_invalid: int = 0
    best_epoch: int = -1
    stopped_early: bool = False

    @property
    def num_epochs(self) -> int:
        """Epochs run."""
        return len(self.train_loss)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data view (JSON-serializable)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def plot(self, ax: Any = None) -> Any:
        """Plot training and validation loss per epoch; returns the axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.5))
        epochs = range(1, self.num_epochs + 1)
        ax.plot(epochs, self.train_loss, label="training")
        if self.val_loss:
            ax.plot(epochs, self.val_loss, label="validation")
        if self.best_epoch >= 0:
            ax.axvline(self.best_epoch + 1, color="grey", ls=":", label="best")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss (negative log density)")
        ax.legend()
        ax.set_title(
            f"{self.num_simulations:,} simulations, {self.num_steps:,} steps, "
            f"{self.wall_time[-1] if self.wall_time else 0:.0f} s"
        )
        return ax
