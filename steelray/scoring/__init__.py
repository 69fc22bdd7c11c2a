"""The nightly scoring job, one module per stage (``job.run`` ties them together):

    plan      what the checkpoint(s) mean: model versions, inputs, output columns, labels
    inputs    the night's inputs: a folder or S3 prefix, a manifest, or one image
    decode    CPU tasks: read, decode, check and resize each input (errors become rows)
    actor     the model actor: checkpoint loaded once, batches to probabilities to rows
    compiled  torch.compile for the actors, and the compile cache for fresh nodes
    output    the Parquet output: the atomic sink, what is done, error-row removal, read-back
    lock      one job at a time per output and model version
    job       ``run``: listing, lock, the Ray Data pipeline, verification, the summary
"""
