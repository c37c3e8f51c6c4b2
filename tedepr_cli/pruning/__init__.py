"""The fine grain: score prunable entries, turn scores into masks, guard against collapse."""
