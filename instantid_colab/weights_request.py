"""Which weights a process loads, as the command line asked: resolved where the process runs.

A Ray worker (`cluster`) gets the request, not paths: it resolves it on its own machine, through the download layer
into its own cache, or from a shared `weights_dir` when one is given.
"""

from __future__ import annotations

from dataclasses import dataclass

from instantid_colab.weights import DEFAULT_BASE, WeightPaths, ensure_weights, lora_file


@dataclass(frozen=True)
class WeightsRequest:
    """The smoke weights, or the real ones through the download layer (a shared `weights_dir`, or this machine's own
    cache), and the LoRAs rows name (on disk before the models load: a missing one is said first)."""

    smoke: bool = False
    weights_dir: str | None = None
    base: str = DEFAULT_BASE
    drive: bool = False
    loras: tuple[str, ...] = ()
    paths: WeightPaths | None = None  # files ready at these paths on every machine (a shared folder), used as they are

    def resolve(self, progress: bool = True) -> WeightPaths:
        if self.paths is not None:
            weights = self.paths
        elif self.smoke:
            from instantid_colab.smoke import build_smoke_weights

            weights = build_smoke_weights()
        else:
            weights = ensure_weights(self.weights_dir, base=self.base, drive=self.drive, progress=progress)
        for name in self.loras:
            lora_file(weights, name)
        return weights
