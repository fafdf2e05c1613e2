"""A BSFG policy in Python (componentize-py), written from plugins/wit/policy.wit alone.

Settings (all optional):
  sites = "PlantA,PlantB"          facts whose `site` label is not listed are denied
  filter_predicates = "heartbeat"  facts with these predicates are filtered (dropped
                                   at intake and recorded, not quarantined)
  require = "operator"             fields object_json must have (parsed with json)
"""
import json

import wit_world
from wit_world.imports import host, types
from componentize_py_types import Err


def _list(value):
    return [v.strip() for v in value.split(",") if v.strip()]


class WitWorld(wit_world.WitWorld):
    sites = []
    filtered = []
    require = []

    def init(self, settings):
        known = {"sites", "filter_predicates", "require"}
        for key, value in settings:
            if key not in known:
                raise Err(f"unknown setting `{key}`")
        cfg = dict(settings)
        WitWorld.sites = _list(cfg.get("sites", ""))
        WitWorld.filtered = _list(cfg.get("filter_predicates", ""))
        WitWorld.require = _list(cfg.get("require", ""))
        host.log(host.Level.INFO, f"site-filter: sites={WitWorld.sites} filtered={WitWorld.filtered}")

    def decide(self, ctx, facts):
        return [self.judge(f) for f in facts]

    def judge(self, fact):
        if fact.predicate in WitWorld.filtered:
            return types.Verdict_Filter(f"predicate `{fact.predicate}` is not wanted here")
        labels = dict(fact.labels)
        if WitWorld.sites and labels.get("site") not in WitWorld.sites:
            return types.Verdict_Deny(f"site `{labels.get('site')}` is not one of {', '.join(WitWorld.sites)}")
        if WitWorld.require:
            try:
                obj = json.loads(fact.object_json)
            except ValueError as e:
                return types.Verdict_Deny(f"object_json is not JSON: {e}")
            for field in WitWorld.require:
                if obj.get(field) is None:
                    return types.Verdict_Deny(f"object_json.{field}: required")
        return types.Verdict_Allow()
