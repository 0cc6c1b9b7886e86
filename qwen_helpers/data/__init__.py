"""Records to training tokens: load and validate records, render with the checkpoint's chat template, trained spans, tokenise, datasets-backed files."""
