"""A small, fixed English corpus for training the tiny checkpoints' tokenizers offline.

The words are the kind that appear in image prompts. The corpus is code, not data fetched from
anywhere, so a tiny checkpoint is reproducible byte for byte on any machine.
"""

from __future__ import annotations

WORDS = """
a an the of in on at with and or to from by for over under above below near far into onto
photo photograph picture painting drawing sketch render illustration portrait landscape
close up wide shot view scene style art artwork digital oil watercolor pencil ink charcoal
red orange yellow green blue purple violet pink brown black white gray grey golden silver
bright dark light soft sharp vivid pale warm cold glowing shiny matte colorful neon pastel
cat cats dog dogs bird birds horse horses fish fox wolf bear lion tiger owl rabbit dragon
robot robots astronaut knight wizard girl boy woman man child people person crowd city
street road bridge river lake sea ocean beach island mountain mountains hill forest tree
trees flower flowers garden field meadow desert snow rain storm cloud clouds sky sun moon
star stars night morning evening sunset sunrise winter summer spring autumn fog mist
house castle tower temple church cabin window door room kitchen library table chair lamp
car train ship boat plane bicycle spaceship planet galaxy nebula universe space station
water fire ice stone rock wood metal glass paper gold crystal smoke steam sand grass leaf
small large tiny huge giant little big tall long short old new ancient modern futuristic
happy sad calm angry quiet peaceful lonely magical mysterious beautiful cute scary epic
standing sitting running flying walking sleeping reading dancing swimming jumping looking
holding wearing riding playing eating drinking smiling watching floating falling burning
hat coat dress shirt shoes glasses crown armor cape helmet mask scarf gloves boots ring
highly detailed intricate realistic photorealistic cinematic dramatic lighting studio
volumetric depth field bokeh lens focus resolution quality masterpiece trending award
minimal simple abstract surreal fantasy science fiction cyberpunk steampunk gothic retro
vintage anime cartoon comic pixel low poly isometric octane unreal engine ray tracing
one two three four five many several some every each both all none other another
is are was were be been being has have had do does did will would can could should may
""".split()


def corpus_lines() -> list[str]:
    """Deterministic training sentences: every word plain, capitalised and upper case, in
    fixed-length windows, plus digits and punctuation so tokenizers see them."""
    variants: list[str] = []
    for word in WORDS:
        variants += [word, word.capitalize(), word.upper()]
    lines = []
    window = 12
    for start in range(0, len(variants), window):
        lines.append(" ".join(variants[start : start + window]))
    lines.append("0 1 2 3 4 5 6 7 8 9 10 42 100 2024 1024x1024")
    lines.append(", . ! ? ; : ' \" ( ) [ ] - _ / + = * & % $ # @")
    return lines
