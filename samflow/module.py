import sys
p = sys.argv[1]
s = open(p).read()
o = """        variant: ``vit_b``, ``vit_l``, ``vit_h`` or ``tiny`` (random, for tests and the quickstart).
        checkpoint: path of the official SAM checkpoint of that variant; None keeps random weights."""
n = """        variant: ``vit_b``, ``vit_l``, ``vit_h``, ``tiny`` (random, for tests and the quickstart), or an
            image encoder with SAM's decoder side: ``mobile_sam``, ``efficient_sam_vitt``,
            ``efficient_sam_vits`` (README, "Other image encoders").
        checkpoint: path of the official checkpoint of that variant; None keeps random weights."""
assert s.count(o) == 1
s = s.replace(o, n)
open(p, "w").write(s)
