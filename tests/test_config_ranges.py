"""Every config field declares what it accepts, and config.check refuses anything else.

The declarations are the `Annotated[type, "rule"]` on each field's line (the rules they may say:
plumbing/ranges.py). These tests walk every field of every section, so a field added without a rule,
or with a rule check does not enforce, fails here.
"""
import dataclasses
import math
import re

import pytest

import ae
import config
import dit
import layerdrop
from plumbing import ranges


def every_field():
    """(section, name, type, rule) of every field of Config."""
    cfg = config.Config()
    return [(s.name, name, typ, rule) for s in dataclasses.fields(cfg)
            for name, typ, rule in ranges.declared(getattr(cfg, s.name))]


def bad_values(typ, rule):
    """Values outside a rule: the wrong type, and where there is one, a value of the right type
    just past the range."""
    wrong_type = {int: "7", float: "x", str: 3, bool: 2, tuple: 3, list: 3}[typ]
    if rule.startswith("each "):
        return [wrong_type, typ(), typ([bad_values(float, rule[5:])[-1]])]
    if typ is float:
        wrong_type = [wrong_type, math.nan, math.inf]
    else:
        wrong_type = [wrong_type]
    if rule in ("any", "finite"):
        return wrong_type
    if "|" in rule:
        return wrong_type + ["nonsense" if typ is str else 99]
    if rule == "a power of 2":
        return wrong_type + [6, 0]
    if m := re.fullmatch(r"(>=|>) (\S+)", rule):
        x = float(m[2])
        return wrong_type + [typ(x - 1 if m[1] == ">=" else x)]
    m = re.fullmatch(r"in ([\[(])(\S+), (\S+)([\])])", rule)
    lo, hi = float(m[2]), float(m[3])
    return wrong_type + [lo if m[1] == "(" else lo - 0.5, hi if m[4] == ")" else hi + 0.5]


@pytest.mark.parametrize("section,name,typ,rule", every_field(),
                         ids=[f"{s}.{n}" for s, n, _, _ in every_field()])
def test_every_field_refuses_values_outside_its_declared_rule(section, name, typ, rule):
    """The default config and every preset pass; each out-of-range value fails, naming the field."""
    for bad in bad_values(typ, rule):
        cfg = config.make_config("tiny")
        setattr(getattr(cfg, section), name, bad)
        with pytest.raises(ValueError, match=rf"^{section}\.{name} must be .*, got ") as e:
            config.check(cfg)
        assert "\n" not in str(e.value)


def test_presets_and_defaults_pass():
    config.check(config.Config())
    for preset in config.PRESETS:
        if preset != "corpus":          # (its optional packages: tests/test_corpus.py)
            config.check(config.make_config(preset))
    config.check(config.make_config("tiny", {"distill.disc_block": "-1", "ae.decoder": "griffin-lim"}))


def test_a_field_without_a_rule_is_refused():
    """A field added as `name: type = default` (no rule) cannot be checked: check says so."""
    @dataclasses.dataclass
    class Section:
        steps: int = 1
    with pytest.raises(TypeError, match="Section.steps declares no range"):
        ranges.declared(Section())


def test_choices_match_the_code():
    """The choices the declarations list are those the code knows."""
    rules = {f"{s}.{n}": r for s, n, _, r in every_field()}
    assert rules["ae.decoder"].split("|") == list(ae.DECODERS)
    assert rules["layerdrop.method"].split("|") == list(layerdrop.METHODS)
    assert rules["model.size"].split("|") == list(dit.SIZES)


@pytest.mark.parametrize("sets,field", [
    ({"data.hop": "512"}, "data.hop"),
    ({"model.size": "XS", "model.heads": "3"}, "model.heads"),
    ({"model.text_heads": "3"}, "model.text_heads"),
    ({"clap.heads": "3"}, "clap.heads"),
    ({"edm.sigma_min": "5", "edm.sigma_max": "1"}, "edm.sigma_max"),
    ({"distill.disc_block": "4"}, "distill.disc_block"),        # tiny: XS, 4 blocks
    ({"layerdrop.schedule": "0.5,1"}, "layerdrop.schedule"),
    ({"layerdrop.st_weight": "0"}, "layerdrop.st_weight"),
    ({"ae.adv_weight": "0.1"}, "ae.adv_weight"),
    ({"model.depth": "1"}, "layerdrop.method"),
    ({"data.n_fft": "16384"}, "data.n_fft"),                     # tiny: 1 s at 8 kHz
    ({"ae.latent_channels": "8", "ae.stride": "64"}, "ae.stride"),  # 62 frames -> 1 latent frame
    ({"model.patch": "100"}, "model.patch"),
    ({"ae.latent_channels": "8", "ae.decoder": "istft", "ae.stft_sizes": "40"}, "ae.stft_sizes"),
    ({"layerdrop.jitter": "4"}, "layerdrop.jitter"),
    ({"train.device": "meta"}, "train.device"),
    ({"data.dataset": " "}, "data.dataset"),
    ({"distill.val_every": "5", "distill.val_clips": "1"}, "distill.val_clips"),
])
def test_rules_between_fields(sets, field):
    cfg = config.make_config("tiny", sets)
    with pytest.raises(ValueError, match=rf"^{re.escape(field)} must be "):
        config.check(cfg)


def test_a_value_of_another_type_is_named_as_such():
    import numpy as np
    cfg = config.make_config("tiny")
    cfg.data.channels = "2"                          # a choice among numbers, given as text
    with pytest.raises(ValueError, match=r"^data.channels must be 1 or 2, got '2'$"):
        config.check(cfg)
    cfg = config.make_config("tiny")
    cfg.train.lr = np.float32(1e-3)
    with pytest.raises(ValueError, match="a numpy.float32, not a Python number"):
        config.check(cfg)


def test_fields_the_code_fills_in_cannot_be_set():
    for key in ("model.in_channels", "model.vocab_size", "model.max_text_len"):
        with pytest.raises(ValueError, match=rf"^{re.escape(key)} is filled in by the code"):
            config.parse_sets([f"{key}=3"])


def test_a_stored_config_with_unknown_fields_is_one_line():
    stored = dataclasses.asdict(config.make_config("tiny"))
    assert config.config_from_dict(stored) == config.make_config("tiny")
    stored["train"]["from_the_future"] = 1
    with pytest.raises(ValueError, match="fields this code does not know: train.from_the_future"):
        config.config_from_dict(stored)


def test_retired_keys_still_work():
    """clap.log_every / ckpt_every / grad_clip moved to the train section (one cadence for every
    stage): a --set of the old key sets the new one, with a warning, and a clap.pt that stored them
    still loads."""
    with pytest.warns(UserWarning, match="clap.ckpt_every is now train.ckpt_every"):
        cfg = config.make_config("tiny", {"clap.ckpt_every": "7"})
    assert cfg.train.ckpt_every == 7
    stored = dataclasses.asdict(config.make_config("tiny"))
    stored["clap"].update(log_every=10, ckpt_every=250, grad_clip=1.0)
    assert config.config_from_dict(stored) == config.make_config("tiny")
