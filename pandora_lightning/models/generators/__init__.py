"""Generator families: one file each (tiny, i2vgen_xl, svd, wan) behind the interface in base.py."""
