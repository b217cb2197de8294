"""`chattune bench`: the tutorial recipe vs chattune's defaults, same model, same samples, same steps, one run.

    chattune bench [model=bundled] [data=FILE] [samples=120] [steps=30] [batch_size=4] [max_length=512]
                   [lora.r=8] [recipes=tutorial,dynamic,chattune] [threads=N] [last=5] [eval_samples=40]
                   [rounds=1] [out=results.json]

recipes.py: what is run (the recipes, the arguments, the shared samples and their order); measure.py: how one
recipe is measured (in its own process); report.py: the means over rounds, the ratios, the table and the JSON;
run.py: `main`, the recipes in rounds, each in a fresh subprocess. The method is in their docstrings.
"""

from chattune.bench.recipes import DEFAULT_DATA, RECIPES, BenchSpec, default_data_path, parse_args, sample_order
from chattune.bench.run import main

__all__ = ["DEFAULT_DATA", "RECIPES", "BenchSpec", "default_data_path", "main", "parse_args", "sample_order"]
