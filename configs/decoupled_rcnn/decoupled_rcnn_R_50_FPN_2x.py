"""LazyConfig of `decoupled_rcnn_R_50_FPN_2x.yaml` (the same detector, data, schedule and solver), for
Detectron2's `lazyconfig_train_net.py` flow or this project's `train_net.py --config-file
configs/decoupled_rcnn/decoupled_rcnn_R_50_FPN_2x.py`. Override with LazyConfig syntax, e.g. `model.cfg.MODEL.WEIGHTS=...`,
`train.max_iter=...`, `dataloader.train.total_batch_size=...` (see `projects/lazy.py`)."""
from projects.lazy import lazy_sections, yaml_next_to

model, dataloader, optimizer, lr_multiplier, train = lazy_sections(yaml_next_to(__file__))
