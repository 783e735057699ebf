"""The store: tables, migrations, the files of raw mails and attachments, the directory."""
