"""The scikit-learn digits as an evaluation plug-in: a judge trained on real digits only reads which digit a generated
image shows; prompt accuracy, the spread of each prompt's samples against the real images of that digit, and the
judge's features for an offline FID (`--prompts digits`, `--fid-features digits`)."""
