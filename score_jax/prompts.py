"""Prompt text for the toy chat template and the fixed correction instruction.

The toy template (used with tokenizers trained by `score_jax.data.toy`) is

    <user>{prompt}<eot><model>{response}<eot>

`<user>`, `<model>` and `<eot>` are single user-defined pieces of the toy tokenizer, so a
rendered turn never merges with the text around it.
"""

USER = "<user>"
MODEL = "<model>"
END_OF_TURN = "<eot>"

# Pieces the toy tokenizer must hold as single, unsplittable tokens.
TOY_SYMBOLS = (USER, MODEL, END_OF_TURN)

# SCoRe's instruction p for attempt 2. It is fixed and says nothing about whether attempt 1
# was right, so it leaks no answer.
TOY_CORRECTION = (
    "There might be an error in the solution above. Please correct the error, if any, and "
    "rewrite the solution. End with the line Answer: <integer>."
)


def render_turn(prompt: str) -> str:
    """Returns the user turn followed by the model-turn opener: `<user>{prompt}<eot><model>`.

    The model's response, then `END_OF_TURN`, follow this text directly.
    """
    return f"{USER}{prompt}{END_OF_TURN}{MODEL}"
