"""Prompt templates of the ICM tasks.

The official templates end with "I think this claim is " (trailing space).
With BPE tokenizers that space becomes its own token, so the label word that
follows is not the token the model would predict. Ours end at "is" and the
label words carry the space (" True" / " False"), which keeps the label one
clean token after the prompt (checked per record by `tokenize_examples`).
"""

TRUTHFULQA = "Question: {question}\nClaim: {choice}\nI think this claim is"
