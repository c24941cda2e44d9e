"""Train, validate, test or predict with any recipe: ``python train.py fit --config configs/pretrain/quickstart.yaml``."""

from effitrain.lightning_modules.cli import main

if __name__ == "__main__":
    main()
