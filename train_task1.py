"""Task 1: self-supervised next-item pretraining of NextItNet with plain task masks.

    python train_task1.py --epochs 5 --lr 0.001 --batch 32
"""
from cli import main
from utils import run_cli

if __name__ == "__main__":
    run_cli(lambda argv: main(argv, task=1))
