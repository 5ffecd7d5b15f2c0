"""The demo at 16 claims, with fine-tuning rows: about 20 minutes on a 2-core
CPU (README "Run the demo", where its measured table is).

  python main.py --config=configs/demo_full.py --workdir=runs/demo_full

configs/demo.py's settings, except: ICM labels the first 8 train pairs (16
claims, 2^8 consistent labellings) in 48 steps per seed, 3x as many steps as
claims; exact mode is what keeps it at 16 (a search's time grows about as
N^3: 16 claims take about 5 min per seed).
Every many-shot row shows all 16 labelled claims. The base model is also
fine-tuned on each label source over the same 16 claims (ICM per seed, gold,
coin flips and inverted gold, the fine-tuning rows' control), then prompted
zero-shot. The fine-tuning recipe (LoRA r=16, lr 2e-4, 4 epochs of batch 4)
is a common LoRA default, fixed before any run; no label was looked at to
choose it.
"""

from icm_jax.configs import demo


def get_config():
  config = demo.get_config()
  config.stages = "label,train,eval"
  config.data.max_train_examples = 16
  config.label.batch_size = 16
  config.search.initial_size = 16
  config.search.max_iterations = 48
  config.eval.methods = (
      "zero_shot,many_shot_gold,many_shot_inverted,many_shot_icm,"
      "many_shot_random,bootstrap_consistent,finetune_gold,finetune_inverted,"
      "finetune_icm,finetune_random")
  config.train.lora_rank = 16
  config.train.learning_rate = 2e-4
  config.train.num_epochs = 4
  config.train.batch_size = 4
  config.train.warmup_steps = 0
  config.train.checkpoint_every = 0
  return config
