"""The fine-tuning tests' format-learning data (test_state_tune.sh,
test_lora_tune.sh): 3000 records of 32 bytes, each a window of --ctx-len
32: "\\nAhoy! " and three random words (seeded), padded with dots.
usage: make_pirate.py OUT.txt"""
import random
import sys

r = random.Random(1)
words = ["cat", "dog", "sun", "map", "sea", "ink", "owl", "fig", "jam", "box", "cup", "hat",
         "key", "pen", "rug", "toy"]
out = []
for _ in range(3000):
    rec = "\nAhoy! %s %s %s" % (r.choice(words), r.choice(words), r.choice(words))
    out.append(rec.ljust(32, "."))
open(sys.argv[1], "w").write("".join(out))
