"""Where a model comes from (:mod:`.source`) and what in it is pruned (:mod:`.structure`)."""
