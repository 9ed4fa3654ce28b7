from pandora_lightning.cli import main

raise SystemExit(main())
