"""TERACON task 6: relation-aware masks and knowledge retention from the task-5 model.

    python train_teracon_t6.py --lr 0.0001 --smax 50 --batch 1024
"""
from cli import main
from utils import run_cli

if __name__ == "__main__":
    run_cli(lambda argv: main(argv, task=6))
