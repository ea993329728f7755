"""Train any task of the sequence: `python train_teracon.py --task 7 --datapath my_task7.csv`.

Task 1 is next-item pretraining; task N >= 2 starts from the task N-1 checkpoint (--paths).
"""
from cli import main
from utils import run_cli

if __name__ == "__main__":
    run_cli(main)
