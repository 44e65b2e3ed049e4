package verb

import (
	"encoding/json"
	"fmt"
)

// filter.removed: a filter a cycle kept for live mail stops judging it.
func init() {
	register(Kind{Name: KindFilterRemoved, Replay: Replay{Why: "it changes no mail: later replays read it as the end of the kept filter"}, Family: "filter", System: true, Describe: func(r Record) Description {
		var a struct {
			Cycle int64 `json:"cycle"`
		}
		if json.Unmarshal(r.Args, &a) != nil || a.Cycle == 0 {
			return Description{What: "filter removed: " + flatten(r.Args)}
		}
		return Description{What: fmt.Sprintf("the filters cycle #%d kept no longer judge live mail", a.Cycle)}
	}})
}
