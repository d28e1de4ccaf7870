"""Data: shard schema, video decode/encode, synthetic shapes, WebDataset writer, Ray Data readers."""
