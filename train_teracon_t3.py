"""TERACON task 3: relation-aware masks and knowledge retention from the task-2 model.

    python train_teracon_t3.py --lr 0.0001 --smax 50 --batch 1024
"""
from cli import main
from utils import run_cli

if __name__ == "__main__":
    run_cli(lambda argv: main(argv, task=3))
