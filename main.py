"""ICM end to end: label a task with ICM, fine-tune on the labels, evaluate.

  python main.py --config=configs/demo.py --workdir=runs/demo

The same command as `icm-jax` (icm_jax/cli.py); see the README.
"""

from icm_jax.cli import main

if __name__ == "__main__":
  main()
