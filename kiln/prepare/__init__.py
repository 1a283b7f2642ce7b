"""The prepare stage's library: raw dataset readers, validation, the stratified split and the manifest."""
