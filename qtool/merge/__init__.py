"""Flow 4: adapters -> merged 16-bit checkpoint. :mod:`.pipeline` streams the merge, :mod:`.verify` checks its logits."""
