"""The ETL stage: source imagery (Blue Marble, a folder, S3) into HR/LR Parquet splits and a manifest."""
