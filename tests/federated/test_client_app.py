"""The ClientApp's guard: with secure aggregation in the site's own config, no update leaves in the clear."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from finetune_trainer.federated import config as fc
from finetune_trainer.federated.client_app import SITE_CONFIG_KEY, site_mod


def _site_config(tmp_path, secure: bool) -> str:
    cfg = fc.SiteConfig(
        job={"namespace": "coord", "name": "fed"}, site="north", superlink="127.0.0.1:9092",
        model=fc.ModelShape(baseModel={"uri": "file:///models/tiny"}), data={"uri": "file:///data", "format": "chat"},
        scratchURI="file:///scratch", rounds=1, localSteps=1, minSites=2, secureAggregation=secure)
    path = tmp_path / f"site-{secure}.json"
    path.write_text(cfg.model_dump_json())
    return str(path)


def _context(path: str) -> Context:
    return Context(run_id=1, node_id=7, node_config={SITE_CONFIG_KEY: path}, state=RecordDict(), run_config={})


pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _train(content: RecordDict) -> Message:
    return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)


def test_a_site_with_secure_aggregation_refuses_a_plain_training_request(tmp_path):
    called = []
    with pytest.raises(PermissionError, match="only through secure aggregation"):
        site_mod(_train(RecordDict()), _context(_site_config(tmp_path, True)),
                 lambda m, c: called.append(m))
    assert not called  # the training (and its update) never ran


def test_a_secagg_message_goes_through_flowers_secaggplus_mod(tmp_path):
    # A SecAgg+ message enters Flower's mod, which checks the protocol's stages: a round that does not
    # start with the setup stage is refused there, before any training.
    content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({"stage": "collect_masked_vectors"})})
    called = []
    with pytest.raises(ValueError, match="Abort secure aggregation"):
        site_mod(_train(content), _context(_site_config(tmp_path, True)), lambda m, c: called.append(m))
    assert not called


def test_without_secure_aggregation_requests_pass_straight_to_the_client(tmp_path):
    seen = []
    msg = _train(RecordDict())
    site_mod(msg, _context(_site_config(tmp_path, False)), lambda m, c: seen.append(m) or m)
    assert seen == [msg]
