"""diskpipe inside OpenStack Glance: an image-import plugin (stevedore entry
point `diskpipe` in the group `glance.image_import.plugins`) that takes the
place of Glance's `image_conversion`.

Install it into Glance's own virtualenv (`pip install diskpipe[glance]`) and
list it in `[image_import_opts] image_import_plugins`. Only `plugin` imports
Glance; `staged` does the work on the staged file and knows nothing of Glance.
"""
