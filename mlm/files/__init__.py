"""Files in the Hugging Face layout: Hub ids and local folders, pretrained weights and configs, datasets, the
tokenized-chunk cache."""
