"""A self-contained API docs page: renders /openapi.json with a little inline JS, no CDN."""

DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pgfleet API</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#1d3557;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
main{max-width:1100px;margin:0 auto;padding:16px 24px}
.tag{margin-top:22px;font-size:17px;border-bottom:1px solid #ccc;padding-bottom:4px}
details{background:#fff;border:1px solid #ddd;border-radius:6px;margin:6px 0}
summary{cursor:pointer;padding:8px 10px;font-family:ui-monospace,monospace}
.m{display:inline-block;min-width:62px;font-weight:700;text-transform:uppercase}
.get{color:#2a7ae2}.post{color:#2e9d4f}.put{color:#c77d00}.patch{color:#8a4fd1}.delete{color:#d33}
.body{padding:4px 14px 12px}pre{background:#f3f3f3;padding:8px;overflow:auto;max-height:340px}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:3px 7px;text-align:left}
#auth{margin:8px 0}input{width:360px}
</style></head>
<body><header><h1 id="title">pgfleet API</h1><div id="desc"></div></header>
<main>
<p>Every endpoint except <code>/healthz</code> needs <code>Authorization: Bearer &lt;token&gt;</code>
(<code>pgfleet token</code> prints it). Machine-readable schema: <a href="/openapi.json">/openapi.json</a>.</p>
<div id="ops">Loading /openapi.json ...</div>
</main>
<script>
function esc(s){return String(s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]))}
function resolve(spec,s){let n=0;while(s&&s.$ref&&n++<20){s=s.$ref.split('/').slice(1).reduce((o,k)=>o[k],spec)}return s}
function expand(spec,s,depth){s=resolve(spec,s);if(!s||depth>6)return s;const o={};
 for(const k of Object.keys(s)){const v=s[k];
  if(k==='properties'){o[k]={};for(const p of Object.keys(v))o[k][p]=expand(spec,v[p],depth+1)}
  else if(k==='items'||k==='additionalProperties')o[k]=typeof v==='object'?expand(spec,v,depth+1):v;
  else if(k==='anyOf'||k==='oneOf'||k==='allOf')o[k]=v.map(x=>expand(spec,x,depth+1));
  else o[k]=v}
 return o}
fetch('/openapi.json').then(r=>r.json()).then(spec=>{
 document.getElementById('title').textContent=spec.info.title+' '+spec.info.version;
 document.getElementById('desc').textContent=spec.info.description||'';
 const groups={};
 for(const [path,item] of Object.entries(spec.paths))for(const [m,op] of Object.entries(item)){
  const tag=(op.tags&&op.tags[0])||'other';(groups[tag]=groups[tag]||[]).push([m,path,op])}
 let html='';
 for(const [tag,ops] of Object.entries(groups)){html+='<div class="tag">'+esc(tag)+'</div>';
  for(const [m,path,op] of ops){html+='<details><summary><span class="m '+m+'">'+m+'</span>'+esc(path)+
   ' &mdash; '+esc(op.summary||'')+'</summary><div class="body">';
   if(op.description)html+='<p>'+esc(op.description)+'</p>';
   if(op.parameters&&op.parameters.length){html+='<b>Parameters</b><table><tr><th>name</th><th>in</th><th>schema</th></tr>';
    for(const p of op.parameters)html+='<tr><td>'+esc(p.name)+(p.required?' *':'')+'</td><td>'+esc(p.in)+
     '</td><td><code>'+esc(JSON.stringify(expand(spec,p.schema,0)))+'</code></td></tr>';html+='</table>'}
   if(op.requestBody){const c=op.requestBody.content['application/json'];
    html+='<b>Body</b><pre>'+esc(JSON.stringify(expand(spec,c&&c.schema,0),null,2))+'</pre>'}
   html+='<b>Responses</b><ul>';for(const [code,r] of Object.entries(op.responses||{}))
    html+='<li>'+esc(code)+': '+esc(r.description||'')+'</li>';html+='</ul></div></details>'}}
 document.getElementById('ops').innerHTML=html;
}).catch(e=>{document.getElementById('ops').textContent='could not load /openapi.json: '+e});
</script></body></html>
"""
