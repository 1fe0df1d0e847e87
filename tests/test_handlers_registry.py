"""What the operator registers with Kopf: level-triggered handlers only.

handlers.py turns Kopf's change detection off (an empty diff base, nothing stored on objects),
which is only right while no change-detecting handler exists: a Kopf on.create/update/resume/
delete/field handler (or an idle timer) would silently never see a change.
"""

from __future__ import annotations

import kopf

from finetune_operator import handlers


def test_no_change_detecting_handlers():
    registry = kopf.get_default_registry()
    assert not registry._changing.get_all_handlers()
    assert all(getattr(h, "idle", None) is None for h in registry._spawning.get_all_handlers())


def test_our_finalizer_is_not_kopfs():
    # Kopf removes its own finalizer whenever no Kopf handler needs it; ours guards the checkpoints.
    assert handlers.FINALIZER != handlers.KOPF_FINALIZER
