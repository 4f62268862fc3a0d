"""Train an LTX-2 / LTX-2.3 model: ``torchrun --nproc_per_node N train.py PRESET [--section.field value ...]``.

Presets live in experiments/presets.py; every field of ltxf.config.TrainConfig can be overridden, e.g.
``--model.checkpoint ltx-2.3.safetensors --data.root data/.precomputed --optim.learning_rate 2e-4``.
``python train.py demo`` runs the CPU demo. ``python train.py PRESET --help`` lists every flag.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import tyro

from experiments.presets import PRESETS
from ltxf.config import TrainConfig
from ltxf.demo import prepare_demo
from ltxf.train import main


def parse_config(args: Sequence[str] | None = None) -> TrainConfig:
    """Pick a preset and apply ``--section.field value`` overrides (booleans take a value too: ``True``/``False``)."""
    # Each preset's description is the first paragraph of its docstring.
    configs = {name: (" ".join((fn.__doc__ or name).strip().split("\n\n")[0].split()), fn())
               for name, fn in PRESETS.items()}
    return tyro.extras.overridable_config_cli(
        configs,
        args=args,
        use_underscores=True,
        console_outputs=int(os.environ.get("RANK", "0")) == 0,
        config=(tyro.conf.FlagConversionOff,),
    )


if __name__ == "__main__":
    main(prepare_demo(parse_config()))
