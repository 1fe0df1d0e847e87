"""The ClientApp: what a site's SuperNode runs for each message of the federation.

Flower starts it (`flwr-clientapp`, one process per message) with the SuperNode's node config, which
names the site's config file (`site-config`). It answers four kinds of message:

    get_properties {"kind": "hello"}   the site's name and its training-example count (numbers only)
    get_properties {"kind": "init"}    the adapter's seeded initialisation (public: seed + base model)
    fit                                one local round; the reply is the update, never the data
    evaluate                           the global adapter's loss on the site's eval split; at the final
                                       evaluation also the site checks the server asks for (bias, pii:
                                       site_checks.py), whose reply is numbers only

With secure aggregation on (the site's own config decides, not the server), training requests are
accepted only through SecAgg+ (`secaggplus_mod`): a plain one, which would carry the update in the
clear, is refused. torch is imported only when a round trains: the SecAgg+ key-exchange messages start
quickly.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from .. import storage
from . import aggregation as agg
from .config import SiteConfig
from .processes import load
from .wire import arrays_to_bytes

SITE_CONFIG_KEY = "site-config"
DONE_FILE_KEY = "done-file"


def site_of(context: Context) -> SiteConfig:
    path = context.node_config.get(SITE_CONFIG_KEY)
    if not path:
        raise ValueError(f"the SuperNode was started without --node-config {SITE_CONFIG_KEY}=PATH")
    return load(str(path), SiteConfig)


def _count_lines(uri: str) -> int:
    return storage.read_bytes(uri).count(b"\n")


def update_uri(site: SiteConfig, round_: int) -> str:
    """The site keeps its own record of what it sent (its storage, never the server's)."""
    return storage.join(site.scratchURI, "federation", "updates", f"round-{round_:04d}.safetensors")


class SiteClient(NumPyClient):
    def __init__(self, context: Context):
        self.context = context
        self.site = site_of(context)

    def get_properties(self, config):
        kind = config.get("kind", "hello")
        if kind == "done":  # the federation is over: tell the site's wrapper to stop its SuperNode
            done = self.context.node_config.get(DONE_FILE_KEY)
            if done:
                Path(str(done)).write_text(json.dumps({"site": self.site.site, "adapter": config.get("adapter", "")}))
            return {"site": self.site.site}
        if kind == "init":
            from .local_round import initial_adapter

            weights, adapter_config = initial_adapter(self.site)
            return {"site": self.site.site, "adapter": arrays_to_bytes(weights), "adapter-config": adapter_config}
        return {"site": self.site.site, "examples": _count_lines(storage.join(self.site.data.uri, "train.jsonl")),
                "data-digest": self.site.data.digest or ""}

    def fit(self, parameters, config):
        from .local_round import run_round

        site = self.site
        names = json.loads(str(config["names"]))
        round_ = int(config["round"])
        received = agg.from_list(parameters, names)
        fed = run_round(site, received, site.localSteps, round_)
        update = agg.site_update(received, fed.local_weights, site.aggregation,
                                 site.model.lora.alpha / site.model.lora.r)
        dp = site.differentialPrivacy
        norm = agg.l2_norm(update)
        if dp.enabled:
            from .privacy import site_noise_std

            rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))  # never a predictable noise seed
            update, norm = agg.clip_and_noise(update, dp.clippingNorm,
                                              site_noise_std(dp.clippingNorm, dp.noiseMultiplier, site.minSites), rng)
        limit = float(config.get("secagg-range", 0.0))
        if limit:
            biggest = max((float(np.max(np.abs(v))) for v in update.values()), default=0.0)
            if biggest > limit:  # SecAgg+ would clip it silently and corrupt the sum
                raise ValueError(f"site {site.site}: an update entry of {biggest:.3g} exceeds the secure-aggregation "
                                 f"range ±{limit}; lower training.learningRate or enable differentialPrivacy clipping")
        storage.write_bytes(update_uri(site, round_), arrays_to_bytes(update, {
            "round": str(round_), "examples": str(fed.examples), "weight": str(1 if dp.enabled else fed.examples)}))
        order = agg.update_names(names, site.aggregation)
        metrics = {"site": site.site, "examples": fed.examples, "eval-examples": fed.eval_examples,
                   "local-loss": fed.mean_loss if fed.mean_loss is not None else float("nan"),
                   "eval-loss": fed.eval_loss if fed.eval_loss is not None else float("nan"),
                   "steps": fed.until_step - fed.start_step, "step": fed.until_step, "update-norm": norm}
        # With DP every site weighs the same: one site's influence on the sum is then at most clippingNorm.
        return agg.to_list(update, order), (1 if dp.enabled else fed.examples), metrics

    def evaluate(self, parameters, config):
        from .local_round import run_round

        from .site_checks import run_site_checks, wanted_of

        names = json.loads(str(config["names"]))
        weights = agg.from_list(parameters, names)
        fed = run_round(self.site, weights, 0, evaluate_base=True)
        metrics = {"site": self.site.site}
        if fed.base_eval_loss is not None and math.isfinite(fed.base_eval_loss):
            metrics["base-eval-loss"] = float(fed.base_eval_loss)
        wanted = wanted_of(config)
        if wanted is not None and wanted.checks:
            report = run_site_checks(self.site, weights, str(config.get("adapter-config") or "{}"), wanted)
            metrics["site-checks"] = report.model_dump_json(exclude_none=True)
        return float(fed.eval_loss), fed.eval_examples, metrics


def site_mod(msg: Message, context: Context, call_next):
    """SecAgg+ around training when this site's config asks for it; and nothing in the clear then."""
    if not site_of(context).secureAggregation:
        return call_next(msg, context)
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS not in msg.content.config_records:
        raise PermissionError("this site sends its update only through secure aggregation (SecAgg+); "
                              "the server asked for it in the clear")
    return secaggplus_mod(msg, context, call_next)


client_app = ClientApp(client_fn=lambda context: SiteClient(context).to_client(), mods=[site_mod])
