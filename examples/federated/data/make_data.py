#!/usr/bin/env python3
"""Write the three sites' slices of one task: routing support tickets to the team that answers them.

Each site (a support desk) only ever sees its own kind of ticket -- north gets billing questions, south
delivery questions, east account questions -- so an adapter trained at one site knows one third of
the task. Deterministic: running it again writes the same files.

    python examples/federated/data/make_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

SLICES = {
    "north": ("billing", ["invoice", "refund", "charge", "payment", "receipt", "price"],
              ["was charged twice", "needs a refund", "cannot find the invoice", "sees a wrong price",
               "wants a receipt", "had a payment fail"],
              "billing team: we checked the {thing} and fixed it."),
    "south": ("delivery", ["parcel", "package", "courier", "shipment", "box", "order"],
              ["is late", "arrived damaged", "went to the wrong door", "was never delivered",
               "is stuck in transit", "came without tracking"],
              "delivery team: we traced the {thing} and sent it again."),
    "east": ("account", ["password", "login", "profile", "email", "username", "account"],
             ["is locked", "cannot be reset", "shows an old name", "will not verify",
              "was changed by mistake", "needs to be closed"],
             "account team: we reset the {thing} and sent a link."),
}
PEOPLE = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jia", "Kai", "Lea"]


def examples(site: str) -> list[dict]:
    _, things, problems, answer = SLICES[site]
    rng = random.Random(site)
    out = []
    for person in PEOPLE:
        for thing in things:
            problem = rng.choice(problems)
            out.append({"instruction": "Route the support ticket and answer it.",
                        "input": f"{person} says the {thing} {problem}.",
                        "output": answer.format(thing=thing)})
    rng.shuffle(out)
    return out


def main() -> None:
    for site in SLICES:
        path = HERE / f"{site}.jsonl"
        path.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in examples(site)))
        print(f"wrote {path} ({len(examples(site))} examples)")


if __name__ == "__main__":
    main()
