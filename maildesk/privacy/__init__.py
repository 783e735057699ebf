"""Privacy: retention, export and the rights of the people whose data the desk keeps."""
