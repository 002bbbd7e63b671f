"""generate's latent-guidance flags (altdiff_min/research/attend_excite.py): --excite WORDS (Attend-and-
Excite), --bind (SynGen's binding loss, each colour word of a toy caption bound to its shape noun, in
nine languages: toy/binding.py) and --bind-pairs MOD=NOUN,… (the same loss on pairs given by text, any
prompt). Words are found in every prompt and the sampler checked before the model loads; the manifest
records the flags and --replay honours them."""
from __future__ import annotations


def add_arguments(gen) -> None:
    gen.add_argument("--excite", metavar="WORDS", help="Attend-and-Excite: before each step, move the latents so "
                     "these words of the prompt (comma-separated, e.g. 'circle,square') are each attended somewhere "
                     "(diffusers' defaults; ddim or dpm++2m)")
    gen.add_argument("--bind", action="store_true", help="SynGen's binding loss: pull each colour word's "
                     "cross-attention onto its shape noun's and away from the other words' (the toy's captions, "
                     "nine languages; ddim or dpm++2m)")
    gen.add_argument("--bind-pairs", metavar="MOD=NOUN,…", help="the binding loss on these (modifier, noun) pairs "
                     "of the prompt, e.g. 'red=circle,blue=square'")


def words(text: str, flag: str) -> list[str]:
    from ..errors import BadValue

    found = [w.strip() for w in text.split(",")]
    if not all(found):
        raise BadValue(f"{flag} takes words separated by commas, e.g. 'circle,square'; got {text!r}")
    return found


def pairs(text: str) -> list[tuple[str, str]]:
    from ..errors import BadValue

    found = [tuple(w.strip() for w in pair.split("=")) for pair in words(text, "--bind-pairs")]
    if not all(len(p) == 2 and all(p) for p in found):
        raise BadValue(f"--bind-pairs takes MODIFIER=NOUN pairs separated by commas, e.g. 'red=circle'; got {text!r}")
    return found


def controllers(args, tokenizer, prompt: str, sampler: str) -> list:
    """The flags' controllers for one prompt, each checked against it and the sampler (one-line errors
    naming the flag)."""
    from ..errors import AltDiffError, BadValue
    from ..research.attend_excite import AttendAndExcite, Bind
    from ..toy.binding import toy_bind

    if args.bind and args.bind_pairs:
        raise BadValue("give --bind (the toy's colour words) or --bind-pairs, not both")
    made = []
    for flag, given, build in (
            ("--excite", args.excite, lambda: AttendAndExcite.for_words(tokenizer, prompt, words(args.excite, flag))),
            ("--bind", args.bind, lambda: toy_bind(tokenizer, prompt)),
            ("--bind-pairs", args.bind_pairs, lambda: Bind.for_pairs(tokenizer, prompt, pairs(args.bind_pairs)))):
        if given:
            try:
                made.append(build())
                made[-1].check(sampler, [prompt])
            except AltDiffError as e:
                raise type(e)(str(e) if str(e).startswith(flag) else f"{flag}: {e}") from None
    return made


def check_before_loading(args, config: dict, prompts: list[str], sampler: str) -> None:
    """The flags against every prompt, with the model folder's tokenizer alone (not with --embedding,
    whose words the tokenizer learns as the model loads: then generate checks them)."""
    import os

    from ..errors import BadValue
    from ..model.tokenizer import Tokenizer
    from ..storage.folder import TOKENIZER, resolve

    if not (args.excite or args.bind or args.bind_pairs):
        return
    if args.compile:
        raise BadValue("--excite and --bind read the UNet's attention, which a compiled UNet hides: drop --compile")
    if not args.embedding:
        tokenizer = Tokenizer(os.path.join(resolve(args.model), TOKENIZER), max_length=config["tokenizer"]["max_length"])
        for prompt in prompts:
            controllers(args, tokenizer, prompt, sampler)


def record(args) -> dict:
    """The manifest's entries for the flags given."""
    return ({"excite": words(args.excite, "--excite")} if args.excite else {}) | ({"bind": True} if args.bind else {}) \
        | ({"bind_pairs": [list(p) for p in pairs(args.bind_pairs)]} if args.bind_pairs else {})


def replay(args, row: dict) -> None:
    """--replay: the recorded flags again (none in a record made without them)."""
    excite, bind_pairs = row.get("excite"), row.get("bind_pairs")
    if excite is not None and not (isinstance(excite, list) and all(isinstance(w, str) for w in excite)):
        raise TypeError("excite is not a list of words")
    if bind_pairs is not None and not (isinstance(bind_pairs, list) and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(w, str) for w in p) for p in bind_pairs)):
        raise TypeError("bind_pairs is not a list of [modifier, noun] pairs")
    args.excite = ",".join(excite) if excite else None
    args.bind = row.get("bind") is True
    args.bind_pairs = ",".join(f"{m}={n}" for m, n in bind_pairs) if bind_pairs else None
