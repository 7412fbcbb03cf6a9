import sys
p = sys.argv[1]
s = open(p).read()
old1 = """        tokens = enc.patch_embed(x)  # (B, h, w, C)
        stack.on_image(x, tokens, ctx)
        x = tokens + enc.pos_embed if enc.pos_embed is not None else tokens
"""
new1 = """        if isinstance(enc, Backbone):  # MobileSAM, EfficientSAM: samflow/sam/backbones
            tokens = enc.embed(x)  # (B, h0, w0, C0)
            stack.on_image(x, tokens, ctx)
            x = enc.add_position(tokens)
        else:
            tokens = enc.patch_embed(x)  # (B, h, w, C)
            stack.on_image(x, tokens, ctx)
            x = tokens + enc.pos_embed if enc.pos_embed is not None else tokens
"""
old2 = """        x = self.plugins.block_input(i, x, ctx)
        x = self._block(i, block, x, ctx)
        return self.plugins.block_output(i, x, ctx)
"""
new2 = """        x = self.plugins.block_input(i, x, ctx)
        enc = self.sam.image_encoder
        if isinstance(enc, Backbone):
            x = enc.run_block(i, x, self.plugins, ctx)
        else:
            x = self._block(i, block, x, ctx)
        return self.plugins.block_output(i, x, ctx)
"""
old3 = "from samflow.batch import SamBatch\n"
new3 = "from samflow.batch import SamBatch\nfrom samflow.sam.backbones import Backbone\n"
for o, n in ((old1, new1), (old2, new2), (old3, new3)):
    assert s.count(o) == 1, o
    s = s.replace(o, n)
open(p, "w").write(s)
